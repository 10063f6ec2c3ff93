"""δ mode in front of a black-box upstream: re-rank the upstream's top-k candidates step by step.

    for each new token:
        upstream /v1/completions(prompt + tokens so far, logprobs=k) ──> top-k (id, logprob)
        score_i = logprob_i + Σ α·(small_unlearned − small_base)[id_i]   (small models here)
        pick: argmax at temperature 0, else sample softmax(score / T) under top_p / top_k

One upstream call per token costs an HTTP round trip and a pass over the prefix each. So the
upstream's own greedy continuation serves as a speculative draft: one call asks for K tokens
with the top-k at each position, the small models score the K positions in one pass, and the
draft is read position by position. At temperature 0 a draft token stands while it is the
re-ranked argmax, and the first one that is not is replaced by the argmax: the tokens are those
of one call per token. When sampling, a draft token x stands with probability p(x) (p the
re-ranked distribution there) and is otherwise replaced by a sample of p without x, which is
speculative sampling with a deterministic draft: each token is distributed as p, as before.
K doubles after a draft read to its end (up to `draft_tokens`) and drops to the number of tokens
that stood plus one after a replacement, so a target that changes most tokens costs about one
call per token, as before, and text the offset leaves alone costs a call per K tokens.

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
from server.engine.stop_strings import first_stop_string, stop_buffer
from server.engine.templating import render_prompt
from server.errors import EngineError, InvalidRequestError

Embed = Callable[[Sequence[int]], torch.Tensor]


class UpstreamDeltaDecoder:
    """Token-by-token δ decoding against an OpenAI-compatible /v1/completions (vLLM's)."""

    def __init__(
        self,
        models: OffsetModels,
        *,
        top_k: int = 20,
        draft_tokens: int = 8,
        embed: Embed | None = None,
    ) -> None:
        if draft_tokens < 1:
            raise ValueError("draft_tokens must be at least 1")
        self._models = models
        self._top_k = top_k
        self._draft_tokens = draft_tokens
        self.calls = 0
        """Upstream calls made (for benchmarks and tests)."""
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
        _refuse_unapplied(s)
        tokenizer = self._tokenizer(request.offsets[0].base)
        prompt_ids, embeds = self._prompt(request, tokenizer)
        room = (max_model_len or 2048) - len(prompt_ids)
        budget = min(s.max_tokens, room) if s.max_tokens else room
        rng = random.Random(s.seed)
        ending = {*s.stop_token_ids, tokenizer.eos_token_id}
        hold = stop_buffer(s.stop)  # no piece of a stop string is sent before the cut at it
        completion = 0
        for index in range(s.n):
            key = f"{request.request_id}/{index}"
            ids: list[int] = []
            text = ""
            decoded = _Text(tokenizer, s.skip_special_tokens)
            size = min(2, self._draft_tokens)
            try:
                while len(ids) < budget:
                    k = min(size, budget - len(ids))
                    draft, candidates = await self._draft(client, model, prompt_ids, embeds, ids, k)
                    scores = await self._rescore(key, request.offsets, prompt_ids + ids, draft,
                                                 candidates)  # fmt: skip
                    stood = 0
                    finish: FinishReason | None = None
                    for drafted, step_scores in zip(draft, scores, strict=True):
                        if len(ids) < s.min_tokens:  # no ending yet (as vLLM's min_tokens)
                            step_scores = _without(step_scores, ending)
                        token = _read(drafted, step_scores, s, rng)
                        ids.append(token)
                        completion += 1
                        searched = len(decoded.text)
                        finish, full = _finish(ids, searched, decoded, tokenizer, s,
                                               len(ids) >= budget)  # fmt: skip
                        sent = len(full) if finish else max(len(text), len(full) - hold)
                        delta = ChoiceDelta(index, full[len(text) : sent], [token],
                                            finish_reason=finish)  # fmt: skip
                        text = full[:sent]
                        yield GenerationChunk([delta], len(prompt_ids), completion)
                        if finish is not None or token != drafted:
                            break
                        stood += 1
                    if finish is not None:
                        break
                    size = min(2 * k, self._draft_tokens) if stood == len(draft) else stood + 1
            finally:
                async with self._lock:  # the caches are the small models' thread's
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

    async def _draft(
        self,
        client: httpx.AsyncClient,
        model: str | None,
        prompt_ids: list[int],
        embeds: torch.Tensor | None,
        ids: list[int],
        k: int,
    ) -> tuple[list[int], list[dict[int, float]]]:
        """The upstream's greedy continuation of up to `k` tokens, and the top-k candidates
        (id -> logprob) at each of its positions."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": k,
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
        self.calls += 1
        try:
            response = await client.post("completions", json=body)
        except httpx.HTTPError as e:
            raise EngineError(f"The upstream engine is unreachable: {type(e).__name__}") from e
        if response.status_code >= 400:
            raise EngineError(f"Upstream failed with {response.status_code}: {response.text[:300]}")
        try:
            logprobs = response.json()["choices"][0]["logprobs"]
            draft = [_token_id(t) for t in logprobs["tokens"]]
            tops = [
                {_token_id(t): float(v) for t, v in top.items()} for top in logprobs["top_logprobs"]
            ]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise EngineError(f"The upstream's logprobs could not be read: {e!r}") from e
        if not 1 <= len(draft) <= k or len(tops) != len(draft) or any(not top for top in tops):
            raise EngineError(
                f"The upstream answered {len(draft)} tokens with {len(tops)} candidate lists "
                f"to a request for at most {k}, each with candidates"
            )
        return draft, tops

    async def _rescore(
        self,
        key: str,
        specs: Sequence[DeltaSpec],
        tokens: list[int],
        draft: list[int],
        candidates: list[dict[int, float]],
    ) -> list[dict[int, float]]:
        """Each draft position's candidates re-scored: logprob + Σ α·offset (after `tokens` and
        the draft tokens before the position)."""
        along = tokens + draft[:-1]

        def offsets() -> torch.Tensor:
            total = torch.zeros(())
            for spec in specs:
                rows = self._models.pair(spec).offsets_along(key, along, len(draft))  # (K, V)
                total = total + spec.alpha * rows
            return total  # (K, V)

        async with self._lock:
            delta = (await _in_thread(offsets)).cpu()  # one copy, not K x top-k reads
        vocab = delta.shape[-1]
        return [
            {t: lp + (float(row[t]) if t < vocab else 0.0) for t, lp in top.items()}
            for row, top in zip(delta, candidates, strict=True)
        ]


async def _in_thread(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`fn` in a worker thread. A request cancelled meanwhile (a client gone) still waits for
    the thread to end before it lets go of the caller's lock: the thread cannot be stopped, and
    another request's step must not run on the same caches beside it."""
    work = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait({work})
        raise


def _token_id(token: object) -> int:
    """vLLM's `token_id:N` (return_tokens_as_token_ids) -> N."""
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise ValueError(f"expected token_id:N, got {token!r}")
    return int(token.removeprefix("token_id:"))


def _read(drafted: int, scores: dict[int, float], s: SamplingOptions, rng: random.Random) -> int:
    """The token at a draft position: the drafted one where it stands, else a replacement, so
    that the token is the argmax of `scores` (temperature 0) or a sample of their distribution."""
    ranked = _distribution(scores, s)
    if len(ranked) == 1:  # temperature 0, or one candidate left
        return ranked[0][0]
    p = dict(ranked)
    if rng.random() < p.get(drafted, 0.0):
        return drafted
    rest = [(t, w) for t, w in ranked if t != drafted]
    return rng.choices([t for t, _ in rest], weights=[w for _, w in rest])[0]


def _distribution(scores: dict[int, float], s: SamplingOptions) -> list[tuple[int, float]]:
    """(token, probability) under temperature, top_k and top_p, most likely first; at
    temperature 0 the argmax alone."""
    temperature = 1.0 if s.temperature is None else s.temperature
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    if temperature <= 0:
        return [(ranked[0][0], 1.0)]
    if s.top_k and s.top_k > 0:
        ranked = ranked[: s.top_k]
    top = ranked[0][1]
    weights = [math.exp((v - top) / temperature) for _, v in ranked]
    if s.min_p:  # tokens under min_p x the likeliest one's probability are dropped
        ranked = [r for r, w in zip(ranked, weights, strict=True) if w >= s.min_p]
        weights = [w for w in weights if w >= s.min_p]
    if s.top_p is not None and s.top_p < 1:
        total, kept, acc = sum(weights), 0, 0.0
        for w in weights:
            kept += 1
            acc += w / total
            if acc >= s.top_p:
                break
        ranked, weights = ranked[:kept], weights[:kept]
    total = sum(weights)
    return [(t, w / total) for (t, _), w in zip(ranked, weights, strict=True)]


class _Text:
    """An answer's text decoded incrementally, as vLLM's detokenizer does: each step decodes
    only the tokens since the last complete piece of text (and that piece, for the spacing
    between them), and text that ends in an incomplete UTF-8 sequence (U+FFFD: an emoji or a CJK
    character split over byte-level tokens) waits for the tokens that complete it. Decoding the
    whole answer at every token cost O(n^2), and sent the replacement character in place of the
    split character, whose completed text then fell out of the stream."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip))

    def add(self, ids: Sequence[int], *, final: bool = False) -> str:
        """The text of `ids` (the answer so far; `text`'s ids and more), less an incomplete
        character at its end unless `final`."""
        seen = self._decode(ids[self._prefix : self._read])
        now = self._decode(ids[self._prefix :])
        if len(now) > len(seen) and (final or not now.endswith("\ufffd")):
            self.text += now[len(seen) :]
            self._prefix, self._read = self._read, len(ids)
        return self.text


def _finish(
    ids: list[int],
    searched: int,
    decoded: _Text,
    tokenizer: Any,
    s: SamplingOptions,
    out_of_budget: bool,
) -> tuple[FinishReason | None, str]:
    """Whether the answer `ids` ends here, and its text, with vLLM's rules: EOS (unless
    ignore_eos) and stop_token_ids end it, the stop token's text left out; once past
    min_tokens, the stop string the new text (past the first `searched` characters, already
    searched before) completes earliest ends it, cut before the stop."""
    token = ids[-1]
    if token in s.stop_token_ids or (token == tokenizer.eos_token_id and not s.ignore_eos):
        return "stop", decoded.add(ids[:-1], final=True)
    text = decoded.add(ids, final=out_of_budget)
    if len(ids) > s.min_tokens and (found := first_stop_string(text, len(text) - searched, s.stop)):
        return "stop", text[: found[1]]
    return ("length" if out_of_budget else None), text


def _without(scores: dict[int, float], banned: set[int]) -> dict[int, float]:
    """The candidates less `banned` (none left: the upstream's top k held nothing else)."""
    kept = {t: v for t, v in scores.items() if t not in banned}
    if not kept:
        raise EngineError(
            "The upstream's candidates held only end-of-text tokens before min_tokens"
        )
    return kept


_UNAPPLIED: tuple[tuple[str, Callable[[SamplingOptions], bool]], ...] = (
    ("logprobs", lambda s: s.logprobs is not None),
    ("prompt_logprobs", lambda s: s.prompt_logprobs is not None),
    ("presence_penalty", lambda s: s.presence_penalty not in (None, 0.0)),
    ("frequency_penalty", lambda s: s.frequency_penalty not in (None, 0.0)),
    ("repetition_penalty", lambda s: s.repetition_penalty not in (None, 1.0)),
    ("logit_bias", lambda s: bool(s.logit_bias)),
    ("bad_words", lambda s: bool(s.bad_words)),
    ("allowed_token_ids", lambda s: s.allowed_token_ids is not None),
    ("response_format", lambda s: s.structured is not None),
    ("include_stop_str_in_output", lambda s: s.include_stop_str_in_output),
)
"""Request fields the re-ranking cannot honour: the upstream's logprobs are the big model's own
(they would show what the offset steers away from), and the penalties, biases and constraints
act on the full logits inside the engine, which this path never sees."""


def _refuse_unapplied(s: SamplingOptions) -> None:
    """A named 400 for the first field a δ request through an upstream asks for in vain."""
    for param, asked in _UNAPPLIED:
        if asked(s):
            raise InvalidRequestError(
                f"{param} is not available for δ-mode requests through an upstream engine",
                param=param,
            )
