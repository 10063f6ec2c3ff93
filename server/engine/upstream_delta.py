"""δ mode in front of a black-box upstream: re-rank the upstream's top-k candidates step by step.

    for each new token (one upstream call per token, max_tokens=1):
        upstream /v1/completions(prompt + tokens so far, logprobs=k) ──> top-k (id, logprob)
        score_i = logprob_i + Σ α·(small_unlearned − small_base)[id_i]   (small models here)
        pick: argmax at temperature 0, else sample softmax(score / T) under top_p / top_k

An approximation of logits = big + α·δ: tokens outside the upstream's top k can never be chosen,
and the big model's own repetition/presence penalties are not re-applied to the new scores.
The small models and their tokenizer (the small base's, which must share the upstream model's
vocabulary and chat template) run in the gateway process.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import torch

from corruption import encode_prompt_embeds
from offset import DeltaSpec, OffsetModels
from server.engine.base import (
    ChatPrompt,
    ChoiceDelta,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    PromptEmbeds,
    SamplingOptions,
    TextPrompt,
    TokenPrompt,
)
from server.engine.templating import render_prompt
from server.errors import EngineError, InvalidRequestError

Embed = Callable[[Sequence[int]], torch.Tensor]


class UpstreamDeltaDecoder:
    """Token-by-token δ decoding against an OpenAI-compatible /v1/completions (vLLM's)."""

    def __init__(
        self, models: OffsetModels, *, top_k: int = 20, embed: Embed | None = None
    ) -> None:
        self._models = models
        self._top_k = top_k
        self._embed = embed
        self._tokenizers: dict[str, Any] = {}
        self._lock = asyncio.Lock()  # one small-model step at a time (their caches are shared)

    def _tokenizer(self, folder: str) -> Any:
        if folder not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[folder] = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return self._tokenizers[folder]

    async def generate(
        self,
        client: httpx.AsyncClient,
        model: str | None,
        request: GenerationRequest,
        max_model_len: int | None,
    ) -> AsyncIterator[GenerationChunk]:
        s = request.sampling
        if s.logprobs is not None:
            raise InvalidRequestError(
                "logprobs are not available for δ-mode requests through an upstream engine",
                param="logprobs",
            )
        tokenizer = self._tokenizer(request.offsets[0].base)
        prompt_ids, embeds = self._prompt(request, tokenizer)
        room = (max_model_len or 2048) - len(prompt_ids)
        budget = min(s.max_tokens, room) if s.max_tokens else room
        rng = random.Random(s.seed)
        completion = 0
        for index in range(s.n):
            key = f"{request.request_id}/{index}"
            ids: list[int] = []
            text = ""
            try:
                for step in range(budget):
                    candidates = await self._candidates(client, model, prompt_ids, embeds, ids)
                    scores = await self._rescore(key, request.offsets, prompt_ids + ids, candidates)
                    token = _pick(scores, s, rng)
                    ids.append(token)
                    completion += 1
                    full = tokenizer.decode(ids, skip_special_tokens=True)
                    finish, full = _finish(token, full, tokenizer, s, step + 1 >= budget)
                    delta = ChoiceDelta(index, full[len(text) :], [token], finish_reason=finish)
                    text = full
                    yield GenerationChunk([delta], len(prompt_ids), completion)
                    if finish is not None:
                        break
            finally:
                for spec in request.offsets:
                    self._models.pair(spec).release(key)

    def _prompt(
        self, request: GenerationRequest, tokenizer: Any
    ) -> tuple[list[int], torch.Tensor | None]:
        p = request.prompt
        if isinstance(p, PromptEmbeds):
            if self._embed is None:
                raise InvalidRequestError(
                    "δ on a corrupted prompt through an upstream needs a local copy of the model "
                    "(--model PATH) to embed the generated tokens"
                )
            return list(p.token_ids), p.embeds
        if isinstance(p, TokenPrompt):
            return list(p.token_ids), None
        assert isinstance(p, ChatPrompt | TextPrompt)
        return render_prompt(tokenizer, p).token_ids, None

    async def _candidates(
        self,
        client: httpx.AsyncClient,
        model: str | None,
        prompt_ids: list[int],
        embeds: torch.Tensor | None,
        ids: list[int],
    ) -> dict[int, float]:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self._top_k,
            "return_tokens_as_token_ids": True,
        }
        if embeds is not None and self._embed is not None:
            # (T + t, H): the corrupted prompt, then the plain embeddings of the new tokens
            full = torch.cat([embeds, self._embed(ids).to(embeds.dtype)]) if ids else embeds
            body["prompt_embeds"] = encode_prompt_embeds(full)
        else:
            body["prompt"] = prompt_ids + ids
        try:
            response = await client.post("completions", json=body)
        except httpx.HTTPError as e:
            raise EngineError(f"The upstream engine is unreachable: {type(e).__name__}") from e
        if response.status_code >= 400:
            raise EngineError(f"Upstream failed with {response.status_code}: {response.text[:300]}")
        top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        return {int(k.removeprefix("token_id:")): float(v) for k, v in top.items()}

    async def _rescore(
        self, key: str, specs: Sequence[DeltaSpec], tokens: list[int], candidates: dict[int, float]
    ) -> dict[int, float]:
        def offsets() -> torch.Tensor:
            total = torch.zeros(())
            for spec in specs:
                total = total + spec.alpha * self._models.pair(spec).offset(key, tokens)  # (V,)
            return total

        async with self._lock:
            delta = await asyncio.to_thread(offsets)
        return {
            t: lp + (float(delta[t]) if t < delta.shape[0] else 0.0) for t, lp in candidates.items()
        }


def _pick(scores: dict[int, float], s: SamplingOptions, rng: random.Random) -> int:
    temperature = 1.0 if s.temperature is None else s.temperature
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    if temperature <= 0:
        return ranked[0][0]
    if s.top_k and s.top_k > 0:
        ranked = ranked[: s.top_k]
    top = ranked[0][1]
    weights = [math.exp((v - top) / temperature) for _, v in ranked]
    if s.top_p is not None and s.top_p < 1:
        total, kept, acc = sum(weights), 0, 0.0
        for w in weights:
            kept += 1
            acc += w / total
            if acc >= s.top_p:
                break
        ranked, weights = ranked[:kept], weights[:kept]
    return rng.choices([t for t, _ in ranked], weights=weights)[0]


def _finish(
    token: int, text: str, tokenizer: Any, s: SamplingOptions, out_of_budget: bool
) -> tuple[FinishReason | None, str]:
    if token == tokenizer.eos_token_id:
        return "stop", text
    for stop in s.stop:
        at = text.find(stop)
        if at >= 0:
            return "stop", text[:at]
    return ("length" if out_of_budget else None), text
