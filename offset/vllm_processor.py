"""δ mode inside vLLM: a batch-level (V1) logits processor adding α·(small_unlearned − small_base).

A request opts in through `SamplingParams.extra_args[DELTA_ARG]` (see `delta_extra_args`): the
small model folders and α of each target in scope, and the prompt's token ids (vLLM gives the
processor none for prompt-embeds requests). Every other request passes through untouched, and a
batch without δ requests costs one dict lookup.

The processor runs where vLLM's engine core runs (a child process by default). It loads each
small model once per folder (a base shared by several targets is loaded once) and keeps both
models' KV caches per request, so a decode step feeds one new token to each, and the requests
sharing a pair of small models step together in one batch per model. If the offset cannot
be computed (a folder vanished, a model failed), the request fails closed: its row is masked to
end-of-sequence, so the answer stops rather than leaking what the offset should have removed.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .delta import OffsetModels, OffsetPair
from .delta_args import parse_delta_args

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    key: int
    terms: list[tuple[OffsetPair, float]]
    prompt: list[int]
    output: list[int]
    """vLLM's live list of the request's generated tokens (it grows in place)."""
    failed: bool = False

    def release(self) -> None:
        for pair, _ in self.terms:
            pair.release(self.key)


class DeltaLogitsProcessor(LogitsProcessor):
    """Adds Σ α·(small_unlearned − small_base) to the logits of the requests that ask for it."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self._models = OffsetModels(device)
        self._requests: dict[int, _Request] = {}
        self._keys = itertools.count()
        eos = vllm_config.model_config.hf_text_config.eos_token_id
        self._eos: list[int] = [eos] if isinstance(eos, int) else list(eos or [])

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_delta_args(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
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
        totals = self._offsets()
        for index, request in self._requests.items():
            offset = totals.get(index)
            if request.failed or offset is None:
                self._end(logits, index)
                continue
            v = min(offset.shape[0], logits.shape[1])
            logits[index, :v] += offset[:v].to(logits.device, logits.dtype)
        return logits

    def _offsets(self) -> dict[int, Tensor]:
        """Σ α·(u − b) (V_small,) per batch row; the rows sharing a pair go through it at once."""
        members: dict[int, tuple[OffsetPair, list[tuple[int, float]]]] = {}
        for index, request in self._requests.items():
            if not request.failed:
                for pair, alpha in request.terms:
                    members.setdefault(id(pair), (pair, []))[1].append((index, alpha))
        totals: dict[int, Tensor] = {}
        for pair, rows in members.values():
            batch = [(self._requests[i].key, self._tokens(self._requests[i])) for i, _ in rows]
            try:
                offsets = pair.offsets(batch)  # (B_pair, V_small)
            except Exception:
                logger.exception("δ offset failed; failing its requests closed")
                for i, _ in rows:
                    self._requests[i].failed = True
                continue
            for (i, alpha), offset in zip(rows, offsets, strict=True):
                totals[i] = offset * alpha if i not in totals else totals[i] + offset * alpha
        return totals

    @staticmethod
    def _tokens(request: _Request) -> list[int]:
        return request.prompt + list(request.output)

    def _end(self, logits: Tensor, index: int) -> None:
        row = torch.full_like(logits[index], float("-inf"))  # (V_big,)
        row[self._eos] = 0.0
        logits[index] = row
