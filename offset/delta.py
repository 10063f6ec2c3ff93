"""δ-unlearning: the logit offset of a small unlearned model against its base."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_gemm import pack_linears

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
    """What one sequence has fed to both small models so far (outside the decode batch)."""

    tokens: list[int]
    unlearned_cache: Any
    base_cache: Any
    offset: Tensor  # (V,), for the token after `tokens`


Layers = list[tuple[Tensor, Tensor]]
"""One (keys, values) pair per layer, each (B, H, W, D)."""


def _layers(cache: Any) -> Layers:
    return [(k, v) for k, v, *_ in cache]


def _cache(layers: Layers) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _left_pad(layers: Layers, mask: Tensor, width: int) -> tuple[Layers, Tensor]:
    """Pad (B, H, w, D) caches and their (B, w) mask on the left to `width` positions."""
    extra = width - mask.shape[1]
    if extra == 0:
        return layers, mask
    padded = [(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in layers]
    return padded, F.pad(mask, (extra, 0))


@dataclass
class _DecodeBatch:
    """Sequences that decode together, both models' KV caches kept batched and left-padded.

    Row r holds its sequence's positions at the right end of the (B, W) mask; a decode step
    appends one column to every row in place, so nothing is re-padded or copied while the
    members stay the same. A change of members rebuilds the batch once.
    """

    seq_ids: list[Hashable]
    tokens: list[list[int]]
    mask: Tensor  # (B, W) long: 0 on the left padding
    unlearned: Any  # DynamicCache, (B, H, W, D) per layer; grown by the models in place
    base: Any
    offsets: Tensor  # (B, V): for the token after each row's `tokens`

    def row(self, seq_id: Hashable) -> int | None:
        try:
            return self.seq_ids.index(seq_id)
        except ValueError:
            return None

    def select(self, rows: Sequence[int]) -> tuple[Layers, Layers, Tensor]:
        """The rows' caches and mask (copies), leading all-padding columns dropped."""
        index = torch.tensor(list(rows), device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())  # all-padding columns
        return (
            [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
             for k, v in _layers(self.unlearned)],
            [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
             for k, v in _layers(self.base)],
            mask[:, start:],
        )  # fmt: skip

    def solo(self, row: int) -> _SequenceState:
        """Row `row` as a sequence of its own (its real positions only)."""
        n = len(self.tokens[row])
        unlearned, base, _ = self.select([row])
        return _SequenceState(
            list(self.tokens[row]),
            _cache([(k[:, :, -n:], v[:, :, -n:]) for k, v in unlearned]),
            _cache([(k[:, :, -n:], v[:, :, -n:]) for k, v in base]),
            self.offsets[row],
        )


def load_causal_lm(
    folder: str | Path, dtype: torch.dtype, device: str, *, attention: str | None = None
) -> Any:
    """A local model folder's causal LM in `dtype` on `device`, in eval mode (`attention`: a
    transformers attention implementation, e.g. "eager"; None: the library's default)."""
    from transformers import AutoModelForCausalLM

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a local model folder (no config.json); point the offset model "
            "settings at a folder saved with save_pretrained (no hub downloads)"
        )
    extra = {} if attention is None else {"attn_implementation": attention}
    model: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, **extra
    )
    return model.to(device).eval()


class PairOffsets(Protocol):
    """What the logits processor needs of a pair: `OffsetPair`, or `RemotePair` in a child."""

    def offsets(self, batch: Sequence[tuple[Hashable, Sequence[int]]]) -> Tensor:
        """Offsets (B, V) for (seq_id, token_ids) pairs, one row each."""
        ...

    def release(self, seq_id: Hashable) -> None:
        """Forget the caches of a finished sequence."""
        ...


class OffsetPair:
    """A small unlearned model and its base; gives the δ offset for the next token of a sequence.

    Each sequence keeps both models' KV caches, so a call that extends the tokens seen before
    feeds only the new ones. A call whose tokens do not extend the cached ones starts over.
    Sequences that decode (one new token per call) are kept in one persistent batch whose
    caches grow in place; a sequence on its own (a prompt, a jump) has caches of its own, at most
    `max_sequences` of them (least recently used are dropped).
    """

    def __init__(self, unlearned: Any, base: Any, *, max_sequences: int = 64) -> None:
        if unlearned.config.vocab_size != base.config.vocab_size:
            raise ValueError("the unlearned and base models must share one vocabulary")
        self.unlearned = unlearned.eval()
        self.base = base.eval()
        self.max_sequences = max_sequences
        self._states: OrderedDict[Hashable, _SequenceState] = OrderedDict()
        self._batch: _DecodeBatch | None = None
        self.rebuilds = 0
        """How many times the decode batch was built (members changed)."""

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

    def _known(self, seq_id: Hashable) -> list[int] | None:
        """The tokens both models have seen for `seq_id` (in the batch or on its own)."""
        batch = self._batch
        row = batch.row(seq_id) if batch is not None else None
        if batch is not None and row is not None:
            return batch.tokens[row]
        state = self._states.get(seq_id)
        return state.tokens if state is not None else None

    def _leave_batch(self, seq_id: Hashable) -> None:
        """Move `seq_id` out of the decode batch into a state of its own."""
        batch = self._batch
        row = batch.row(seq_id) if batch is not None else None
        if batch is None or row is None:
            return
        self._states[seq_id] = batch.solo(row)
        self._drop_rows([row])

    def _drop_rows(self, rows: Sequence[int]) -> None:
        batch = self._batch
        assert batch is not None
        keep = [r for r in range(len(batch.seq_ids)) if r not in set(rows)]
        if not keep:
            self._batch = None
            return
        unlearned, base, mask = batch.select(keep)
        self._batch = _DecodeBatch(
            [batch.seq_ids[r] for r in keep],
            [batch.tokens[r] for r in keep],
            mask,
            _cache(unlearned),
            _cache(base),
            batch.offsets[keep],
        )

    @torch.inference_mode()
    def offset(self, seq_id: Hashable, token_ids: Sequence[int]) -> Tensor:
        """Offset (V,) = small_unlearned − small_base for the token after `token_ids`."""
        tokens = list(token_ids)
        if not tokens:
            raise ValueError("token_ids must not be empty")
        batch = self._batch
        row = batch.row(seq_id) if batch is not None else None
        if batch is not None and row is not None:
            if tokens == batch.tokens[row]:
                return batch.offsets[row]
            if len(tokens) == len(batch.tokens[row]) + 1 and tokens[:-1] == batch.tokens[row]:
                return self._step([(seq_id, tokens)])[0]
            self._leave_batch(seq_id)
        return self.offsets_along(seq_id, tokens, 1)[0]

    @torch.inference_mode()
    def offsets_along(self, seq_id: Hashable, token_ids: Sequence[int], n: int) -> Tensor:
        """Offsets (n, V) for the token after each of the last n prefixes of `token_ids` (row j:
        after `token_ids[: len - n + 1 + j]`), from the sequence's own caches.

        What the caches hold beyond the part they share with `token_ids` is cut off first (a
        speculative draft's rejected tokens), so only the tokens after the shared part, and at
        least the last n, are fed.
        """
        tokens = list(token_ids)
        if not 1 <= n <= len(tokens):
            raise ValueError("n must be between 1 and the number of tokens")
        self._leave_batch(seq_id)
        state = self._states.get(seq_id)
        if state is not None and n == 1 and tokens == state.tokens:
            self._states.move_to_end(seq_id)
            return state.offset[None]
        keep = 0
        if state is not None:
            keep = min(_shared_prefix(state.tokens, tokens), len(tokens) - n)
            if keep < len(state.tokens) and not _cut(state, keep):
                keep = 0  # a cache that cannot be cut (sliding-window layers): start over
        new = torch.tensor([tokens[keep:]], device=self.device)  # (1, T_new)
        caches = (None, None) if state is None or keep == 0 else (
            state.unlearned_cache, state.base_cache
        )  # fmt: skip
        # Only the last n positions' logits are computed (a prompt's others are not needed).
        out_u = self.unlearned(
            input_ids=new, past_key_values=caches[0], use_cache=True, logits_to_keep=n
        )
        out_b = self.base(
            input_ids=new, past_key_values=caches[1], use_cache=True, logits_to_keep=n
        )
        rows: Tensor = out_u.logits[0, -n:].float() - out_b.logits[0, -n:].float()  # (n, V)
        self._states[seq_id] = _SequenceState(
            tokens, out_u.past_key_values, out_b.past_key_values, rows[-1].clone()
        )
        self._states.move_to_end(seq_id)
        while len(self._states) > self.max_sequences:
            self._states.popitem(last=False)
        return rows

    @torch.inference_mode()
    def offsets(self, batch: Sequence[tuple[Hashable, Sequence[int]]]) -> Tensor:
        """Offsets (B, V) for (seq_id, token_ids) pairs, one row each.

        Sequences that extend what both models have seen by exactly one token (a decode step)
        run together in the persistent decode batch, one step per model: a one-token step is
        bound by reading the weights, so a batch reads them once for all its sequences instead
        of once each. The rest (prompts, repeats, jumps) run one by one.
        """
        stepping: list[int] = []
        seen: set[Hashable] = set()
        for i, (seq_id, ids) in enumerate(batch):
            known = self._known(seq_id)
            if (
                known is not None
                and seq_id not in seen
                and len(ids) == len(known) + 1
                and list(ids[:-1]) == known
            ):
                stepping.append(i)
                seen.add(seq_id)
        rows: dict[int, Tensor] = {}
        if stepping:
            stepped = self._step([(batch[i][0], list(batch[i][1])) for i in stepping])
            rows = dict(zip(stepping, stepped, strict=True))
        return torch.stack(
            [
                rows[i] if i in rows else self.offset(seq_id, ids)
                for i, (seq_id, ids) in enumerate(batch)
            ]
        )  # (B, V)

    def _regroup(self, seq_ids: Sequence[Hashable]) -> None:
        """Make the decode batch hold exactly `seq_ids` (each in the batch or on its own)."""
        batch = self._batch
        wanted = set(seq_ids)
        if batch is not None:
            for seq_id in [s for s in batch.seq_ids if s not in wanted]:
                self._leave_batch(seq_id)  # still alive (released ones are gone already)
            batch = self._batch
        pieces: list[tuple[Layers, Layers, Tensor]] = []
        ids: list[Hashable] = []
        tokens: list[list[int]] = []
        offsets: list[Tensor] = []
        if batch is not None:
            pieces.append(batch.select(range(len(batch.seq_ids))))
            ids += batch.seq_ids
            tokens += batch.tokens
            offsets += list(batch.offsets)
        for seq_id in seq_ids:
            if seq_id in ids:
                continue
            state = self._states.pop(seq_id)
            n = len(state.tokens)
            mask = torch.ones((1, n), dtype=torch.long, device=self.device)
            pieces.append((_layers(state.unlearned_cache), _layers(state.base_cache), mask))
            ids.append(seq_id)
            tokens.append(state.tokens)
            offsets.append(state.offset)
        width = max(mask.shape[1] for _, _, mask in pieces)
        unlearned, base, masks = [], [], []
        for u, b, mask in pieces:
            padded_u, padded_mask = _left_pad(u, mask, width)
            unlearned.append(padded_u)
            base.append(_left_pad(b, mask, width)[0])
            masks.append(padded_mask)
        self._batch = _DecodeBatch(
            ids, tokens, torch.cat(masks), _stacked(unlearned), _stacked(base), torch.stack(offsets)
        )
        self.rebuilds += 1

    def _step(self, items: Sequence[tuple[Hashable, list[int]]]) -> list[Tensor]:
        """One decode step of `items` (each one token past what the models saw), batched."""
        batch = self._batch
        if batch is None or set(batch.seq_ids) != {seq_id for seq_id, _ in items}:
            self._regroup([seq_id for seq_id, _ in items])
            batch = self._batch
        assert batch is not None
        rows = [batch.seq_ids.index(seq_id) for seq_id, _ in items]
        new = torch.zeros((len(rows), 1), dtype=torch.long, device=self.device)  # (B, 1)
        for row, (_, ids) in zip(rows, items, strict=True):
            new[row, 0] = ids[-1]
        positions = batch.mask.sum(-1, keepdim=True)  # (B, 1): real tokens so far
        mask = F.pad(batch.mask, (0, 1), value=1)  # (B, W + 1)
        logits = []
        for model, cache in ((self.unlearned, batch.unlearned), (self.base, batch.base)):
            out = model(
                input_ids=new,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,  # grows by one column, in place
                use_cache=True,
            )
            logits.append(out.logits[:, -1].float())  # (B, V)
        batch.offsets = logits[0] - logits[1]  # (B, V)
        batch.mask = mask
        for row, (_, ids) in zip(rows, items, strict=True):
            batch.tokens[row] = ids
        return [batch.offsets[row] for row in rows]

    def release(self, seq_id: Hashable) -> None:
        """Forget the caches of a finished sequence."""
        self._states.pop(seq_id, None)
        batch = self._batch
        row = batch.row(seq_id) if batch is not None else None
        if row is not None:
            self._drop_rows([row])


def _cut(state: _SequenceState, keep: int) -> bool:
    """Cut both caches of `state` to their first `keep` tokens; False where a cache cannot be
    cut (transformers' sliding-window layers past their window), left for the caller to drop."""
    cut = keep - len(state.tokens)  # < 0: that many tokens off the end
    logger.debug("cache cut from %d to %d tokens", len(state.tokens), keep)
    try:
        state.unlearned_cache.crop(cut)
        state.base_cache.crop(cut)
    except (RuntimeError, ValueError):
        return False
    return True


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _stacked(pieces: Sequence[Layers]) -> Any:
    """One cache whose rows are the pieces' rows, in order (all of one width)."""
    return _cache(
        [
            (torch.cat([p[layer][0] for p in pieces]), torch.cat([p[layer][1] for p in pieces]))
            for layer in range(len(pieces[0]))
        ]
    )


@dataclass(frozen=True)
class DeltaSpec:
    """One target's offset: α·(unlearned − base), two local model folders sharing a vocabulary."""

    unlearned: str
    base: str
    alpha: float = 1.0


class OffsetModels:
    """Small models loaded once per folder (a shared base once), one `OffsetPair` per pair.

    On a CPU they are made for one-token steps: eager attention (one query against a short
    cache costs less than the fused kernel's setup) and linear layers on weights prepacked for
    oneDNN (`offset.cpu_gemm`): together 1.8x faster a step than transformers' defaults for
    SmolLM2-135M in bf16 (docs/results/delta-bench.md).
    """

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
            cpu = torch.device(self.device).type == "cpu"
            model = load_causal_lm(key, self.dtype, self.device, attention="eager" if cpu else None)
            if cpu:
                packed = pack_linears(model)
                logger.info("δ: %d linear layers of %s on oneDNN's packed GEMM", packed, key)
            self._models[key] = model
        return self._models[key]

    def pair(self, spec: DeltaSpec) -> OffsetPair:
        """The pair for `spec`, loading its models on first use."""
        key = (spec.unlearned, spec.base)
        if key not in self._pairs:
            self._pairs[key] = OffsetPair(
                self._model(spec.unlearned), self._model(spec.base), max_sequences=256
            )
        return self._pairs[key]
