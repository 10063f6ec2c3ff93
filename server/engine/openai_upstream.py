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
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
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
    ToolCallDelta,
    TopLogprob,
)
from server.engine.tool_parsing import ToolParsing, ToolStream
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
        tool_parsing: ToolParsing | None = None,
    ):
        self._config = config
        self._delta = delta
        # Flagged chat requests go upstream as /v1/completions prompt embeddings, where the
        # upstream parses no tool calls: this (vLLM's parser, as the upstream runs it) does.
        self._tool_parsing = tool_parsing
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

    async def tokenize(
        self,
        prompt: ChatPrompt | TextPrompt,
        add_special_tokens: bool | None = None,
        token_strs: bool = False,
    ) -> RenderedPrompt:
        """/tokenize on the upstream (vLLM serves it next to /v1)."""
        body: dict[str, Any] = {"model": self._upstream_model}
        if isinstance(prompt, ChatPrompt):
            body["messages"] = prompt.openai_messages()
            if prompt.tools:
                body["tools"] = [dict(t) for t in prompt.tools]
            body.update(_template_fields(prompt.template_kwargs))
        else:
            body["prompt"] = prompt.text
        if add_special_tokens is not None:
            body["add_special_tokens"] = add_special_tokens
        if token_strs:
            body["return_token_strs"] = True
        data = await self._root_post("tokenize", body)
        return RenderedPrompt(
            text="", token_ids=[int(t) for t in data["tokens"]], token_strs=data.get("token_strs")
        )

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        """/detokenize on the upstream."""
        data = await self._root_post(
            "detokenize", {"model": self._upstream_model, "tokens": list(token_ids)}
        )
        return str(data["prompt"])

    async def _root_post(self, path: str, body: dict[str, Any]) -> Any:
        if not self.ready:
            raise UnavailableError("The upstream engine is not reachable yet")
        root = self._config.base_url.rstrip("/").removesuffix("/v1")
        try:
            response = await self._client.post(f"{root}/{path}", json=body)
        except httpx.HTTPError as e:
            raise EngineError(f"The upstream engine is unreachable: {type(e).__name__}") from e
        if response.status_code >= 400:
            raise _upstream_error(response)
        return response.json()

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
            body["messages"] = p.openai_messages()
            body.update(_template_fields(p.template_kwargs))
            if request.tools is not None:
                body["tools"] = [dict(t) for t in request.tools.tools]
                body["tool_choice"] = request.tools.tool_choice
                if request.tools.parallel_tool_calls is not None:
                    body["parallel_tool_calls"] = request.tools.parallel_tool_calls
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

    def _local_tools(
        self, request: GenerationRequest
    ) -> tuple[GenerationRequest, ToolStream | None]:
        """A flagged chat with tools goes as prompt embeddings: constrain and parse it here."""
        if request.tools is None or not isinstance(request.prompt, PromptEmbeds):
            return request, None
        if request.tools.tool_choice == "none":
            return request, None
        if self._tool_parsing is None:
            raise UnavailableError(
                "This request concerns a protected topic and uses tools; the gateway needs "
                "--tools.tool-call-parser (the upstream's parser) to answer it through prompt "
                "embeddings. It was not sent.",
                code="tool_parser_required",
            )
        self._tool_parsing.check(request.tools)
        session = self._tool_parsing.session(None, request.tools, request.sampling.structured)
        sampling = replace(request.sampling, structured=session.constraint)
        return replace(request, sampling=sampling), ToolStream(session, request.stream)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """POST upstream with stream=true and translate each SSE chunk."""
        if not self.ready:
            raise UnavailableError("The upstream engine is not reachable yet")
        if request.sampling.prompt_logprobs is not None:
            # Flagged prompts travel as embeddings, for which vLLM computes no prompt logprobs;
            # refusing them on every request keeps a flagged request indistinguishable.
            raise InvalidRequestError(
                "prompt logprobs (and echo with logprobs) are not available in front of an "
                "upstream engine",
                param="prompt_logprobs",
            )
        if request.offsets:
            if request.tools is not None or request.sampling.structured:
                raise InvalidRequestError(
                    "tools and structured outputs are not available for δ-mode requests "
                    "through an upstream engine",
                    param="tools" if request.tools is not None else "response_format",
                )
            async for chunk in self._generate_delta(request):
                yield chunk
            return
        request, tools = self._local_tools(request)
        path, body = self._body(request)
        chat = path.startswith("chat")
        if chat and request.tools is not None and not request.stream:
            # vLLM parses a whole answer's tool calls differently from a stream's (a call cut
            # short stays text in the whole answer): ask for the answer the client asked for.
            yield await self._whole_chat(request, path, body)
            return
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
                    if tools is not None:
                        parsed = (tools.apply(d, None) for d in deltas)
                        deltas = [d for d in parsed if d is not None]
                    yield GenerationChunk(deltas, prompt_tokens, completion_tokens)
                else:  # the connection closed cleanly, but the answer is cut short
                    raise EngineError("The upstream engine closed the stream before [DONE]")
        except httpx.TimeoutException as e:
            raise EngineError("The upstream engine timed out") from e
        except httpx.HTTPError as e:
            raise EngineError(f"The upstream engine is unreachable: {type(e).__name__}") from e
        finally:
            self._streams -= 1

    async def _whole_chat(
        self, request: GenerationRequest, path: str, body: dict[str, Any]
    ) -> GenerationChunk:
        """One non-streaming chat answer (closing the request aborts it upstream, as vLLM
        aborts a non-streaming request whose client is gone)."""
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        self._streams += 1
        try:
            response = await self._client.post(
                path, json=body, headers={"X-Request-Id": request.request_id}
            )
        except httpx.TimeoutException as e:
            raise EngineError("The upstream engine timed out") from e
        except httpx.HTTPError as e:
            raise EngineError(f"The upstream engine is unreachable: {type(e).__name__}") from e
        finally:
            self._streams -= 1
        if response.status_code >= 400:
            raise _upstream_error(response)
        try:
            data = response.json()
            choices = [
                _delta({**c, "delta": c.get("message") or {}}, True) for c in data["choices"]
            ]
            used = data["usage"]
            return GenerationChunk(choices, used["prompt_tokens"], used["completion_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise EngineError("The upstream sent a malformed answer") from e

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
        "stop_token_ids": list(s.stop_token_ids) or None,
        "ignore_eos": s.ignore_eos or None,
        "include_stop_str_in_output": s.include_stop_str_in_output or None,
        "skip_special_tokens": None if s.skip_special_tokens else False,
        "spaces_between_special_tokens": None if s.spaces_between_special_tokens else False,
        "bad_words": list(s.bad_words) or None,
        "allowed_token_ids": list(s.allowed_token_ids) if s.allowed_token_ids else None,
        "structured_outputs": dict(s.structured) if s.structured else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


# Template keyword arguments vLLM's chat request takes as fields of their own.
_TEMPLATE_FIELDS = ("add_generation_prompt", "continue_final_message", "documents")


def _template_fields(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The chat template's kwargs as vLLM chat-request fields."""
    fields = {k: kwargs[k] for k in _TEMPLATE_FIELDS if kwargs.get(k) is not None}
    if kwargs.get("reasoning_effort") is not None:
        fields["reasoning_effort"] = kwargs["reasoning_effort"]
    rest = {k: v for k, v in kwargs.items() if k not in _TEMPLATE_FIELDS + ("reasoning_effort",)}
    if rest:
        fields["chat_template_kwargs"] = rest
    return fields


def _delta(choice: dict[str, Any], chat: bool) -> ChoiceDelta:
    message = choice.get("delta") or {}
    text = (message.get("content") or "") if chat else choice.get("text") or ""
    calls = [
        ToolCallDelta(
            index=int(c.get("index", i)),  # whole answers list their calls without an index
            id=c.get("id"),
            name=(c.get("function") or {}).get("name"),
            arguments=(c.get("function") or {}).get("arguments"),
        )
        for i, c in enumerate(message.get("tool_calls") or [] if chat else [])
    ]
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
    n_tokens = len(parsed) if parsed is not None else (1 if text or calls else 0)
    return ChoiceDelta(
        index=choice.get("index", 0),
        text=text,
        token_ids=[-1] * n_tokens,
        logprobs=parsed,
        finish_reason=choice.get("finish_reason"),
        stop_reason=choice.get("stop_reason"),
        tool_calls=calls or None,
        null_content=chat and bool(calls) and message.get("content") is None,
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
