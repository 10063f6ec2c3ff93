"""The served model's input-embedding table, prompt position masks, and base64 prompt_embeds.

Only the embedding tensor is read from the checkpoint (never the whole model): for llama-family
models a looked-up row is exactly what the model's `get_input_embeddings()` returns, which is what
vLLM expects as `prompt_embeds`. Models that scale embeddings inside `forward` (Gemma's
sqrt(hidden) normaliser) are not special-cased here.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EmbeddingTable",
    "PromptTokens",
    "decode_prompt_embeds",
    "encode_prompt_embeds",
    "mask_for_ranges",
    "tokenize_prompt",
]

logger = logging.getLogger(__name__)

# Known names of the input-embedding weight, most common first.
_EMBEDDING_KEYS = (
    "model.embed_tokens.weight",
    "embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
    "model.decoder.embed_tokens.weight",
)
_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "word_embeddings.weight",
)
_TIED_OUTPUT_KEYS = ("lm_head.weight",)
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def _key_to_file(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name in the folder's safetensors to the file holding it."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    files = [model_dir / _SINGLE_FILE] if (model_dir / _SINGLE_FILE).is_file() else []
    files = files or sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or {_INDEX_FILE}) in model folder {model_dir}")
    mapping: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            mapping.update(dict.fromkeys(handle.keys(), file))
    return mapping


def _ties_embeddings(model_dir: Path) -> bool:
    config = model_dir / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    text_config = data.get("text_config") or {}
    return bool(data.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))


def _find_embedding_key(keys: Sequence[str], *, tied: bool) -> str | None:
    for key in _EMBEDDING_KEYS:
        if key in keys:
            return key
    suffixed = sorted(k for k in keys if k.endswith(_EMBEDDING_SUFFIXES))
    if suffixed:
        return suffixed[0]
    if tied:  # A tied checkpoint may store only the output projection, which is the same matrix.
        return next((k for k in _TIED_OUTPUT_KEYS if k in keys), None)
    return None


class EmbeddingTable:
    """The served model's input-embedding matrix (vocab, hidden), for prompt_embeds lookups."""

    def __init__(self, weight: torch.Tensor, *, source: str = "<tensor>") -> None:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"embedding weight must be a 2-D float tensor, got {weight.shape}")
        self.weight = weight  # (V, H)
        self.source = source
        self._std: float | None = None

    @classmethod
    def from_model_dir(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        key: str | None = None,
    ) -> EmbeddingTable:
        """Read only the input-embedding tensor from a model folder's safetensors."""
        model_dir = Path(path)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder not found: {model_dir}")
        key_files = _key_to_file(model_dir)
        chosen = key or _find_embedding_key(list(key_files), tied=_ties_embeddings(model_dir))
        if chosen is None or chosen not in key_files:
            sample = ", ".join(sorted(key_files)[:8])
            raise KeyError(
                f"no input-embedding tensor in {model_dir} (looked for {key or _EMBEDDING_KEYS}); "
                f"pass key= explicitly. Some tensor names: {sample}"
            )
        with safe_open(str(key_files[chosen]), framework="pt", device=str(device)) as handle:
            weight = handle.get_tensor(chosen)
        if dtype is not None:
            weight = weight.to(dtype)
        logger.info("loaded %s %s from %s", chosen, tuple(weight.shape), key_files[chosen])
        return cls(weight, source=f"{key_files[chosen]}:{chosen}")

    @property
    def vocab_size(self) -> int:
        """Rows of the table (may exceed the tokenizer's vocabulary: padded)."""
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        """Width of one embedding."""
        return int(self.weight.shape[1])

    @property
    def std(self) -> float:
        """Standard deviation of all entries: the natural unit for noise strengths."""
        if self._std is None:
            self._std = float(self.weight.float().std())
        return self._std

    def lookup(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Return the embeddings (T, H) of token ids, as a new tensor."""
        index = torch.as_tensor(ids, dtype=torch.long, device=self.weight.device)
        if index.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}")
        return self.weight[index]  # (T, H); advanced indexing copies


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt: ids and each token's (start, end) character offsets in the prompt."""

    ids: list[int]
    offsets: list[tuple[int, int]]

    def mask(
        self, spans: Sequence[tuple[int, int]], *, fallback: Sequence[tuple[int, int]] = ()
    ) -> torch.Tensor:
        """Bool mask (T,) of tokens overlapping `spans`, else of tokens in `fallback` ranges."""
        selected = mask_for_ranges(self.offsets, spans)
        if not bool(selected.any()):
            selected = mask_for_ranges(self.offsets, fallback)
        return selected


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, add_special_tokens: bool = False
) -> PromptTokens:
    """Tokenize the full (templated) prompt as the engine will, keeping character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast (Rust) tokenizer is needed for character offsets")
    encoded = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = [int(i) for i in encoded["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in encoded["offset_mapping"]]
    return PromptTokens(ids=ids, offsets=offsets)


def mask_for_ranges(
    offsets: Sequence[tuple[int, int]],
    ranges: Sequence[tuple[int, int]],
    *,
    exclude_last: bool = True,
) -> torch.Tensor:
    """Bool mask (T,): tokens whose characters overlap any [start, end) range.

    Zero-width tokens (added special tokens) are never selected, and neither is the prompt's
    last token when `exclude_last` (the position the first answer token is predicted from).
    """
    if not len(offsets) or not len(ranges):
        return torch.zeros(len(offsets), dtype=torch.bool)
    tokens = torch.tensor(offsets, dtype=torch.long)  # (T, 2)
    spans = torch.tensor(ranges, dtype=torch.long)  # (R, 2)
    start, end = tokens[:, :1], tokens[:, 1:]  # (T, 1) each
    overlaps = (start < spans[:, 1]) & (end > spans[:, 0])  # (T, R)
    mask = overlaps.any(dim=-1) & (tokens[:, 1] > tokens[:, 0])  # (T,)
    if exclude_last:
        mask[-1] = False
    return mask


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """Serialise (T, H) embeddings as vLLM's server expects: base64 of `torch.save` bytes."""
    if embeds.dim() != 2:
        raise ValueError(f"prompt_embeds must be (tokens, hidden), got {tuple(embeds.shape)}")
    # clone(): torch.save writes a view's whole storage, e.g. the full table behind a slice.
    compact = embeds.detach().to("cpu").contiguous().clone()
    buffer = io.BytesIO()
    torch.save(compact, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_prompt_embeds(data: str) -> torch.Tensor:
    """Inverse of `encode_prompt_embeds` (tests and debugging; weights_only load)."""
    payload = base64.b64decode(data, validate=True)
    tensor = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError("payload is not a tensor")
    return tensor
