"""δ-unlearning: the logit offset of a small unlearned model against its base."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


def offset_logits(
    big: Tensor, small_unlearned: Tensor, small_base: Tensor, *, alpha: float
) -> Tensor:
    """Return big + α·(small_unlearned − small_base) for (B, V) logits, in `big`'s dtype.

    The small models may have fewer vocabulary columns than the big one (engines pad the
    vocabulary): the offset is then added to the first V_small columns only.
    """
    if small_unlearned.shape != small_base.shape:
        raise ValueError(
            f"small logits differ in shape: {tuple(small_unlearned.shape)} "
            f"vs {tuple(small_base.shape)}"
        )
    if big.dim() != 2 or small_unlearned.dim() != 2 or big.shape[0] != small_unlearned.shape[0]:
        raise ValueError(
            f"expected (B, V) logits, got {tuple(big.shape)} and {tuple(small_unlearned.shape)}"
        )
    v_small = small_unlearned.shape[1]
    if v_small > big.shape[1]:
        raise ValueError(f"small vocabulary {v_small} exceeds the big model's {big.shape[1]}")
    delta = (small_unlearned.float() - small_base.float()) * alpha  # (B, V_small)
    out = big.float().clone()  # (B, V)
    out[:, :v_small] += delta.to(out.device)
    return out.to(big.dtype)


@dataclass
class _SequenceState:
    """What one sequence has fed to both small models so far."""

    tokens: list[int]
    unlearned_cache: Any
    base_cache: Any
    offset: Tensor  # (V,), for the token after `tokens`


def _left_padded(caches: Sequence[Any], lengths: Sequence[int], width: int) -> Any:
    """One DynamicCache (B, H, W, D) per layer from per-sequence caches (1, H, n_i, D)."""
    from transformers import DynamicCache

    layers = []
    for per_sequence in zip(*(list(c) for c in caches), strict=True):  # one layer, every sequence
        keys, values = [], []
        for (k, v, *_), n in zip(per_sequence, lengths, strict=True):
            keys.append(F.pad(k, (0, 0, width - n, 0)))  # (1, H, W, D): zeros on the left
            values.append(F.pad(v, (0, 0, width - n, 0)))
        layers.append((torch.cat(keys), torch.cat(values)))  # (B, H, W, D) each
    return DynamicCache(ddp_cache_data=layers)


def _unpadded(cache: Any, lengths: Sequence[int]) -> list[Any]:
    """Per-sequence DynamicCaches (1, H, n_i, D) from a left-padded batched one."""
    from transformers import DynamicCache

    layers = [(k, v) for k, v, *_ in cache]  # (B, H, W + 1, D) each
    return [
        DynamicCache(
            ddp_cache_data=[(k[row : row + 1, :, -n:], v[row : row + 1, :, -n:]) for k, v in layers]
        )
        for row, n in enumerate(lengths)
    ]


def load_causal_lm(folder: str | Path, dtype: torch.dtype, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a local model folder (no config.json); point the offset model "
            "settings at a folder saved with save_pretrained (no hub downloads)"
        )
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


class OffsetPair:
    """A small unlearned model and its base; gives the δ offset for the next token of a sequence.

    Each sequence keeps both models' KV caches, so a call that extends the tokens seen before
    feeds only the new ones. A call whose tokens do not extend the cached ones starts over.
    At most `max_sequences` caches are kept (least recently used are dropped).
    """

    def __init__(self, unlearned: Any, base: Any, *, max_sequences: int = 64) -> None:
        if unlearned.config.vocab_size != base.config.vocab_size:
            raise ValueError("the unlearned and base models must share one vocabulary")
        self.unlearned = unlearned.eval()
        self.base = base.eval()
        self.max_sequences = max_sequences
        self._states: OrderedDict[Hashable, _SequenceState] = OrderedDict()

    @classmethod
    def from_folders(
        cls,
        unlearned_dir: str | Path,
        base_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        max_sequences: int = 64,
    ) -> OffsetPair:
        """Load both models from local folders saved with save_pretrained."""
        return cls(
            load_causal_lm(unlearned_dir, dtype, device),
            load_causal_lm(base_dir, dtype, device),
            max_sequences=max_sequences,
        )

    @property
    def device(self) -> torch.device:
        """Device of the small models."""
        return next(self.unlearned.parameters()).device  # type: ignore[no-any-return]

    @torch.inference_mode()
    def full_offsets(self, token_ids: Sequence[int]) -> Tensor:
        """Offsets (T, V) for every position of one sequence, without caches."""
        ids = torch.tensor([list(token_ids)], device=self.device)  # (1, T)
        unlearned: Tensor = self.unlearned(input_ids=ids).logits[0].float()  # (T, V)
        base: Tensor = self.base(input_ids=ids).logits[0].float()  # (T, V)
        return unlearned - base

    @torch.inference_mode()
    def offset(self, seq_id: Hashable, token_ids: Sequence[int]) -> Tensor:
        """Offset (V,) = small_unlearned − small_base for the token after `token_ids`."""
        tokens = list(token_ids)
        if not tokens:
            raise ValueError("token_ids must not be empty")
        state = self._states.get(seq_id)
        if state is not None and tokens[: len(state.tokens)] != state.tokens:
            logger.debug("sequence %r diverged from its cache; recomputing", seq_id)
            state = None
        if state is not None and len(tokens) == len(state.tokens):
            self._states.move_to_end(seq_id)
            return state.offset
        start = 0 if state is None else len(state.tokens)
        new = torch.tensor([tokens[start:]], device=self.device)  # (1, T_new)
        out_u = self.unlearned(
            input_ids=new,
            past_key_values=None if state is None else state.unlearned_cache,
            use_cache=True,
        )
        out_b = self.base(
            input_ids=new,
            past_key_values=None if state is None else state.base_cache,
            use_cache=True,
        )
        offset: Tensor = out_u.logits[0, -1].float() - out_b.logits[0, -1].float()  # (V,)
        self._states[seq_id] = _SequenceState(
            tokens, out_u.past_key_values, out_b.past_key_values, offset
        )
        self._states.move_to_end(seq_id)
        while len(self._states) > self.max_sequences:
            self._states.popitem(last=False)
        return offset

    @torch.inference_mode()
    def offsets(self, batch: Sequence[tuple[Hashable, Sequence[int]]]) -> Tensor:
        """Offsets (B, V) for (seq_id, token_ids) pairs, one row each.

        Sequences that extend their cache by exactly one token (a decode step) run together, one
        left-padded step per model: a one-token step is bound by reading the weights, so a batch
        reads them once for all its sequences instead of once each. The rest run one by one.
        """
        stepping: list[int] = []
        seen: set[Hashable] = set()
        for i, (seq_id, ids) in enumerate(batch):
            state = self._states.get(seq_id)
            if (
                state is not None
                and seq_id not in seen
                and len(ids) == len(state.tokens) + 1
                and list(ids[:-1]) == state.tokens
            ):
                stepping.append(i)
                seen.add(seq_id)
        rows: dict[int, Tensor] = {}
        if len(stepping) > 1:
            stepped = self._step([(batch[i][0], list(batch[i][1])) for i in stepping])
            rows = dict(zip(stepping, stepped, strict=True))
        return torch.stack(
            [
                rows[i] if i in rows else self.offset(seq_id, ids)
                for i, (seq_id, ids) in enumerate(batch)
            ]
        )  # (B, V)

    def _step(self, batch: Sequence[tuple[Hashable, list[int]]]) -> list[Tensor]:
        """One decode step of several cached sequences in one batch per model."""
        states = [self._states[seq_id] for seq_id, _ in batch]
        lengths = [len(state.tokens) for state in states]
        width = max(lengths)
        new = torch.tensor([[ids[-1]] for _, ids in batch], device=self.device)  # (B, 1)
        mask = torch.zeros((len(batch), width + 1), dtype=torch.long, device=self.device)
        for row, n in enumerate(lengths):
            mask[row, width - n :] = 1  # (B, W + 1): left padding is masked out
        positions = torch.tensor([[n] for n in lengths], device=self.device)  # (B, 1)
        logits, caches = [], []
        for model, own in (
            (self.unlearned, [s.unlearned_cache for s in states]),
            (self.base, [s.base_cache for s in states]),
        ):
            out = model(
                input_ids=new,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=_left_padded(own, lengths, width),
                use_cache=True,
            )
            logits.append(out.logits[:, -1].float())  # (B, V)
            caches.append(_unpadded(out.past_key_values, [n + 1 for n in lengths]))
        offsets = logits[0] - logits[1]  # (B, V)
        for row, (seq_id, ids) in enumerate(batch):
            self._states[seq_id] = _SequenceState(ids, caches[0][row], caches[1][row], offsets[row])
            self._states.move_to_end(seq_id)
        return list(offsets)

    def release(self, seq_id: Hashable) -> None:
        """Forget the caches of a finished sequence."""
        self._states.pop(seq_id, None)


@dataclass(frozen=True)
class DeltaSpec:
    """One target's offset: α·(unlearned − base), two local model folders sharing a vocabulary."""

    unlearned: str
    base: str
    alpha: float = 1.0


class OffsetModels:
    """Small models loaded once per folder (a shared base once), one `OffsetPair` per pair."""

    def __init__(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.device = str(device)
        self.dtype = dtype
        self._models: dict[str, Any] = {}
        self._pairs: dict[tuple[str, str], OffsetPair] = {}

    def _model(self, folder: str) -> Any:
        key = str(Path(folder).resolve())
        if key not in self._models:
            logger.info("δ: loading %s on %s", key, self.device)
            self._models[key] = load_causal_lm(key, self.dtype, self.device)
        return self._models[key]

    def pair(self, spec: DeltaSpec) -> OffsetPair:
        """The pair for `spec`, loading its models on first use."""
        key = (spec.unlearned, spec.base)
        if key not in self._pairs:
            self._pairs[key] = OffsetPair(
                self._model(spec.unlearned), self._model(spec.base), max_sequences=256
            )
        return self._pairs[key]
