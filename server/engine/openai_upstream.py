"""Any OpenAI-compatible server as the engine (vLLM's api_server, a hosted endpoint).

Requests always stream from the upstream (one code path; a client that asked for no stream
gets the chunks joined), so a disconnect closes the upstream connection and vLLM aborts the
request there. Prompt embeddings travel as base64 `torch.save` tensors on /v1/completions,
which needs an upstream started with `--enable-prompt-embeds`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from corruption import encode_prompt_embeds
from server.engine.base import (
    ChatPrompt,
    ChoiceDelta,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    PromptEmbeds,
    RenderedPrompt,
    SamplingOptions,
    TextPrompt,
    TokenLogprob,
    TokenPrompt,
    TopLogprob,
)
from server.engine.upstream_delta import UpstreamDeltaDecoder
from server.errors import (
    EngineError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    UnavailableError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamConfig:
    base_url: str
    api_key: str | None = None
    model: str | None = None
    served_model_name: str | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    max_connections: int = 256
    retry_interval_s: float = 2.0


class OpenAIUpstreamEngine:
    """`Engine` over httpx to an OpenAI-compatible /v1."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        delta: UpstreamDeltaDecoder | None = None,
    ):
        self._config = config
        self._delta = delta
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            ),
            transport=transport,
        )
        self._upstream_model: str | None = config.model
        self._max_model_len: int | None = None
        self._ready = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None
        self._streams = 0

    @property
    def model(self) -> ModelCard:
        served = self._config.served_model_name or self._upstream_model or "upstream"
        return ModelCard(id=served, max_model_len=self._max_model_len, root=self._config.base_url)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def running(self) -> int:
        return self._streams

    async def start(self) -> None:
        """Probe /models until the upstream answers (in the background: /health stays up)."""
        self._probe = asyncio.create_task(self._wait_for_upstream())

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def _wait_for_upstream(self) -> None:
        while True:
            try:
                response = await self._client.get("models")
                response.raise_for_status()
                models = response.json()["data"]
                chosen = next(
                    (m for m in models if m["id"] == self._upstream_model),
                    models[0] if models else None,
                )
                if chosen is None:
                    raise ValueError("the upstream lists no models")
                self._upstream_model = chosen["id"]
                self._max_model_len = chosen.get("max_model_len")
                self._ready.set()
                logger.info("Upstream %s serves %s", self._config.base_url, self._upstream_model)
                return
            except (httpx.HTTPError, ValueError, KeyError) as e:
                logger.warning("Upstream %s not ready: %s", self._config.base_url, e)
                await asyncio.sleep(self._config.retry_interval_s)

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._client.aclose()

    def render(self, prompt: ChatPrompt | TextPrompt) -> RenderedPrompt | None:
        """The upstream owns its chat template; nothing to say here."""
        return None

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self._upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": s.n,
        }
        p = request.prompt
        if isinstance(p, ChatPrompt):
            path = "chat/completions"
            body["messages"] = list(p.messages)
            if s.logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = s.logprobs
        else:
            path = "completions"
            if isinstance(p, PromptEmbeds):
                body["prompt_embeds"] = encode_prompt_embeds(p.embeds)
            elif isinstance(p, TokenPrompt):
                body["prompt"] = list(p.token_ids)
            else:
                body["prompt"] = p.text
            if s.logprobs is not None:
                body["logprobs"] = s.logprobs
        body.update(_sampling_fields(s))
        return path, body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """POST upstream with stream=true and translate each SSE chunk."""
        if not self.ready:
            raise UnavailableError("The upstream engine is not reachable yet")
        if request.offsets:
            async for chunk in self._generate_delta(request):
                yield chunk
            return
        path, body = self._body(request)
        chat = path.startswith("chat")
        prompt_tokens = completion_tokens = 0
        self._streams += 1
        try:
            async with self._client.stream(
                "POST", path, json=body, headers={"X-Request-Id": request.request_id}
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _upstream_error(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError as e:
                        raise EngineError("The upstream sent a malformed stream chunk") from e
                    if "error" in chunk:
                        raise EngineError(f"Upstream error: {chunk['error'].get('message')}")
                    if chunk.get("usage"):
                        prompt_tokens = chunk["usage"]["prompt_tokens"]
                        completion_tokens = chunk["usage"]["completion_tokens"]
                    deltas = [_delta(c, chat) for c in chunk.get("choices", [])]
                    completion_tokens += sum(len(d.token_ids) for d in deltas)
                    yield GenerationChunk(deltas, prompt_tokens, completion_tokens)
                else:  # the connection closed cleanly, but the answer is cut short
                    raise EngineError("The upstream engine closed the stream before [DONE]")
        except httpx.TimeoutException as e:
            raise EngineError("The upstream engine timed out") from e
        except httpx.HTTPError as e:
            raise EngineError(f"The upstream engine is unreachable: {type(e).__name__}") from e
        finally:
            self._streams -= 1

    async def _generate_delta(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._delta is None:
            raise UnavailableError("δ mode is not enabled on this gateway's upstream engine")
        self._streams += 1
        try:
            async for chunk in self._delta.generate(
                self._client, self._upstream_model, request, self._max_model_len
            ):
                yield chunk
        finally:
            self._streams -= 1


def _sampling_fields(s: SamplingOptions) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repetition_penalty": s.repetition_penalty,
        "seed": s.seed,
        "stop": list(s.stop) or None,
        "logit_bias": {str(k): v for k, v in s.logit_bias.items()} if s.logit_bias else None,
        "min_tokens": s.min_tokens or None,
        "vllm_xargs": s.extra_args,
        "bad_words": list(s.bad_words) or None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _delta(choice: dict[str, Any], chat: bool) -> ChoiceDelta:
    text = (choice.get("delta") or {}).get("content") or "" if chat else choice.get("text") or ""
    logprobs = choice.get("logprobs")
    parsed: list[TokenLogprob] | None = None
    if logprobs and chat and logprobs.get("content") is not None:
        parsed = [
            TokenLogprob(
                t["token"],
                t["logprob"],
                tuple(TopLogprob(a["token"], a["logprob"]) for a in t.get("top_logprobs", [])),
            )
            for t in logprobs["content"]
        ]
    elif logprobs and not chat:
        parsed = [
            TokenLogprob(
                tok,
                lp if lp is not None else 0.0,
                tuple(TopLogprob(k, v) for k, v in (top or {}).items()),
            )
            for tok, lp, top in zip(
                logprobs["tokens"],
                logprobs["token_logprobs"],
                logprobs["top_logprobs"] or [],
                strict=False,
            )
        ]
    # Token ids are not on the wire; count one per logprob entry, else one per non-empty delta.
    n_tokens = len(parsed) if parsed is not None else (1 if text else 0)
    return ChoiceDelta(
        index=choice.get("index", 0),
        text=text,
        token_ids=[-1] * n_tokens,
        logprobs=parsed,
        finish_reason=choice.get("finish_reason"),
        stop_reason=choice.get("stop_reason"),
    )


def _upstream_error(response: httpx.Response) -> GatewayError:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500] or response.reason_phrase
    status = response.status_code
    if status == 404:
        return NotFoundError(f"Upstream: {message}")
    if status == 429:
        return RateLimitError(f"Upstream: {message}", headers={"Retry-After": "1"})
    if 400 <= status < 500:
        return InvalidRequestError(f"Upstream: {message}")
    return EngineError(f"Upstream failed with {status}: {message}")
