"""δ mode inside vLLM: a batch-level (V1) logits processor adding α·(small_unlearned − small_base).

A request opts in through `SamplingParams.extra_args[DELTA_ARG]` (see `delta_extra_args`): the
small model folders and α of each target in scope, and the prompt's token ids (vLLM gives the
processor none for prompt-embeds requests). Every other request passes through untouched, and a
batch without δ requests costs one dict lookup.

The processor runs where vLLM's engine core runs (a child process by default). It loads each
small model once per folder, in the engine's dtype (a base shared by several targets is loaded
once) and keeps both models' KV caches per request, so a decode step feeds one new token to
each, and the requests sharing a pair of small models step together in one batch per model. If
the offset cannot be computed (a folder vanished, a model failed), the request fails closed: its
row is masked to end-of-sequence, so the answer stops rather than leaking what the offset should
have removed.

Overlap: the small models need only the tokens sampled so far, which vLLM has appended when it
calls `update_state` at the start of a step, before the big model's forward pass. So the offsets
are computed there, on a helper thread, while the big model runs, and `apply` only waits for
them. On a CPU the helper thread is bound to the cores vLLM's worker is not bound to (vLLM
reserves them for its scheduler, which spins while the worker computes); on a GPU it uses its
own CUDA stream. Without a spare core the offsets are computed in `apply`, as before.
`OBLIVIATE_DELTA_OVERLAP=0` turns the helper off, `=1` forces it (tests).

`OBLIVIATE_DELTA_PROCESS=1` runs the small models in a child process instead, bound to the
spare CPUs (`offset.offset_process`), so that their Python does not take turns with the big
model's under the worker's interpreter lock; the helper thread then only waits for its answer.
It is off by default: on 2 cores (fp32, SmolLM2 x3) it reached 0.72 of δ's ideal ratio against
0.86 in process, the "spare" core being the one vLLM's busy scheduler and the gateway run on
(docs/results/delta-bench.md). Machines with cores truly to spare may measure otherwise.
"""

from __future__ import annotations

import itertools
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .delta import OffsetModels, PairOffsets
from .delta_args import parse_delta_args
from .offset_process import OffsetProcess

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    key: int
    terms: list[tuple[PairOffsets, float]]
    prompt: list[int]
    output: list[int]
    """vLLM's live list of the request's generated tokens (it grows in place)."""
    failed: bool = False

    def release(self) -> None:
        for pair, _ in self.terms:
            pair.release(self.key)


Tokens = dict[int, list[int]]
"""Batch row -> the tokens of its request so far (prompt + output)."""


@dataclass
class _Offsets:
    """Σ α·(u − b) per batch row for the tokens in `tokens`, and the rows that failed."""

    tokens: Tokens
    totals: dict[int, Tensor] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)


def _spare_cpus() -> set[int]:
    """CPUs this process may use that its calling thread is not bound to (vLLM's reserve)."""
    try:
        bound = os.sched_getaffinity(0)
        every = set(range(os.cpu_count() or 0))
    except (AttributeError, OSError):
        return set()
    return every - bound


def _small_models(
    device: torch.device, dtype: torch.dtype, spare: set[int]
) -> OffsetModels | OffsetProcess:
    """The small models in this process, or (opt-in) in a child process on the spare CPUs."""
    if device.type == "cpu" and os.environ.get("OBLIVIATE_DELTA_PROCESS", "0") == "1":
        return OffsetProcess(dtype, spare)
    return OffsetModels(device, dtype)


def _helper(device: torch.device, spare: set[int]) -> ThreadPoolExecutor | None:
    """The thread that computes offsets during the big model's forward pass, if it helps."""
    mode = os.environ.get("OBLIVIATE_DELTA_OVERLAP", "auto")
    if mode == "0":
        return None
    if mode != "1" and device.type == "cpu" and not spare:
        return None  # it would share the worker's core: no overlap, only switching

    def bind() -> None:
        if spare:
            try:
                os.sched_setaffinity(0, spare)  # this thread only (Linux)
            except OSError:
                logger.warning("δ: could not bind the offset thread to CPUs %s", sorted(spare))
        if device.type == "cuda":
            torch.cuda.set_stream(torch.cuda.Stream(device))  # type: ignore[no-untyped-call]

    logger.info("δ: small models run beside the big one (spare CPUs: %s)", sorted(spare) or "-")
    return ThreadPoolExecutor(1, thread_name_prefix="obliviate-delta", initializer=bind)


class DeltaLogitsProcessor(LogitsProcessor):
    """Adds Σ α·(small_unlearned − small_base) to the logits of the requests that ask for it."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        # The small models run in the engine's dtype: float32 beside a bfloat16 engine made each
        # δ step cost 4x the big model's on a CPU with native bf16 (docs/results/delta-bench.md).
        dtype = getattr(vllm_config.model_config, "dtype", None)
        spare = _spare_cpus() if device.type == "cpu" else set()
        self._models = _small_models(
            device, dtype if isinstance(dtype, torch.dtype) else torch.float32, spare
        )
        self._requests: dict[int, _Request] = {}
        self._keys = itertools.count()
        self._device = device
        self._helper = _helper(device, spare)
        self._pending: Future[_Offsets] | None = None
        eos = vllm_config.model_config.hf_text_config.eos_token_id
        self._eos: list[int] = [eos] if isinstance(eos, int) else list(eos or [])

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_delta_args(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._settle()  # nothing below may race a computation still running
        if batch_update is not None:
            self._apply_update(batch_update)
        if self._helper is not None and self._requests:
            tokens = self._current_tokens()
            if tokens and all(t >= 0 for ids in tokens.values() for t in ids[-1:]):
                # (a negative id is a placeholder of async scheduling: compute it in apply)
                self._pending = self._helper.submit(self._compute, tokens)

    def _settle(self) -> _Offsets | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending.result()  # _compute catches model failures itself

    def _apply_update(self, batch_update: BatchUpdate) -> None:
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._drop(index)
            request = self._new_request(params, prompt_ids, output_ids)
            if request is not None:
                self._requests[index] = request
        for a, b, direction in batch_update.moved:
            moved_a = self._requests.pop(a, None)
            moved_b = self._requests.pop(b, None)
            if moved_a is not None:
                self._requests[b] = moved_a
            if moved_b is not None:
                if direction == MoveDirectionality.SWAP:
                    self._requests[a] = moved_b
                else:  # overwritten by the one-way move
                    moved_b.release()

    def _drop(self, index: int) -> None:
        request = self._requests.pop(index, None)
        if request is not None:
            request.release()

    def _new_request(
        self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> _Request | None:
        try:
            parsed = parse_delta_args(params.extra_args)
        except ValueError:
            logger.exception("δ arguments rejected in the engine; failing the request closed")
            return _Request(next(self._keys), [], [], output_ids, failed=True)
        if parsed is None:
            return None
        specs, given_prompt = parsed
        prompt = prompt_ids if prompt_ids is not None else given_prompt
        request = _Request(next(self._keys), [], list(prompt or []), output_ids)
        if not prompt:
            logger.error("δ request without prompt token ids; failing it closed")
            request.failed = True
            return request
        try:
            request.terms = [(self._models.pair(s), s.alpha) for s in specs]
        except Exception:
            logger.exception("δ offset models failed to load; failing the request closed")
            request.failed = True
        return request

    def apply(self, logits: Tensor) -> Tensor:
        # logits: (B, V_big), one row per request of the persistent batch
        if not self._requests:
            return logits
        tokens = self._current_tokens()
        ready = self._settle()
        result = ready if ready is not None and ready.tokens == tokens else self._compute(tokens)
        for index in result.failed:
            self._requests[index].failed = True
        for index, request in self._requests.items():
            offset = result.totals.get(index)
            if request.failed or offset is None:
                self._end(logits, index)
                continue
            v = min(offset.shape[0], logits.shape[1])
            logits[index, :v] += offset[:v].to(logits.device, logits.dtype)
        return logits

    def _current_tokens(self) -> Tokens:
        return {i: self._tokens(r) for i, r in self._requests.items() if not r.failed}

    def _compute(self, tokens: Tokens) -> _Offsets:
        """Σ α·(u − b) (V_small,) per batch row; the rows sharing a pair go through it at once.

        Runs on the helper thread during the big model's forward pass, or in `apply`; only reads
        the requests (marking failures is left to `apply`).
        """
        result = _Offsets(tokens)
        members: dict[int, tuple[PairOffsets, list[tuple[int, float]]]] = {}
        for index in tokens:
            for pair, alpha in self._requests[index].terms:
                members.setdefault(id(pair), (pair, []))[1].append((index, alpha))
        for pair, rows in members.values():
            batch = [(self._requests[i].key, tokens[i]) for i, _ in rows]
            try:
                offsets = pair.offsets(batch)  # (B_pair, V_small)
                if offsets.device.type == "cuda":
                    torch.cuda.current_stream(offsets.device).synchronize()
            except Exception:
                logger.exception("δ offset failed; failing its requests closed")
                result.failed.update(i for i, _ in rows)
                continue
            for (i, alpha), offset in zip(rows, offsets, strict=True):
                totals = result.totals
                totals[i] = offset * alpha if i not in totals else totals[i] + offset * alpha
        return result

    @staticmethod
    def _tokens(request: _Request) -> list[int]:
        return request.prompt + list(request.output)

    def _end(self, logits: Tensor, index: int) -> None:
        row = torch.full_like(logits[index], float("-inf"))  # (V_big,)
        row[self._eos] = 0.0
        logits[index] = row
