"""The request path: check the request, let the guard decide the prompt, generate, format.

    route ──> GenerationService.create_chat_completion / create_completion
                 │ guard.protect(prompt)   (services/guard.py: classify; a flagged prompt comes
                 │                          back corrupted, with the δ offsets in scope)
                 │ output.generate(...)     (services/output_guard.py: engine.generate, token ids
                 │                          untouched or prompt embeddings, + δ; the text watched
                 │                          as it streams and restarted protected if it names a
                 │                          target)
                 └ formatting: one JSON response, or SSE chunks ending in [DONE]

Errors raised before the first token (validation, context length, engine refusal) become
plain HTTP errors: each stream is primed with its first chunk before the response starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Protocol

from server.engine import (
    ChatPrompt,
    ChoiceDelta,
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TextPrompt,
    TokenPrompt,
    ToolOptions,
)
from server.errors import GatewayError, InvalidRequestError, NotFoundError, error_sse
from server.metrics import Metrics
from server.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from server.protocol.common import UsageInfo, usage
from server.protocol.completion import CompletionRequest, CompletionResponse
from server.protocol.models import ModelList, ModelObject
from server.services import requests
from server.services.formatting import (
    DONE,
    ChoiceState,
    Echo,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
)
from server.services.guard import Guarded
from server.services.output_guard import OutputWatcher, UnwatchedOutput
from server.services.request_limits import RequestLimits
from server.services.tenancy import Caller


class PromptGuard(Protocol):
    """Decides what the engine sees: the prompt untouched, or a protected version of it."""

    async def protect(
        self,
        prompt: ChatPrompt | TextPrompt | TokenPrompt,
        request_id: str,
        caller: Caller | None = None,
    ) -> Guarded:
        """The prompt to send (a flagged one comes back as corrupted embeddings) and the δ
        offsets to add to the engine's logits; `caller` scopes the targets (tenants)."""


class PassthroughGuard:
    """No targets: every prompt goes to the engine as it came."""

    async def protect(
        self,
        prompt: ChatPrompt | TextPrompt | TokenPrompt,
        request_id: str,
        caller: Caller | None = None,
    ) -> Guarded:
        return Guarded(prompt)


Primed = tuple[GenerationChunk, AsyncIterator[GenerationChunk]]


class GenerationService:
    """Chat and text completions through the guard and the engine."""

    def __init__(
        self,
        engine: Engine,
        guard: PromptGuard,
        metrics: Metrics,
        limits: RequestLimits | None = None,
        output: OutputWatcher | None = None,
    ) -> None:
        self._engine = engine
        self._guard = guard
        self._output = output or UnwatchedOutput(engine)
        self._metrics = metrics
        self._limits = limits or RequestLimits()
        self._created = int(time.time())

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def limits(self) -> RequestLimits:
        return self._limits

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def list_models(self) -> ModelList:
        """The one served model."""
        card = self._engine.model
        return ModelList(
            data=[
                ModelObject(
                    id=card.id,
                    created=self._created,
                    root=card.root,
                    max_model_len=card.max_model_len,
                )
            ]
        )

    def check_model(self, name: str | None) -> str:
        """The served model's name; 404 for any other (a missing name means the served one)."""
        served = self._engine.model.id
        if name is not None and name != served:
            raise NotFoundError(
                f"The model `{name}` does not exist; this server serves `{served}`.",
                param="model",
                code="model_not_found",
            )
        return served

    async def create_chat_completion(
        self, req: ChatCompletionRequest, request_id: str, caller: Caller | None = None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """Run one chat request; a stream comes back as SSE strings."""
        model = self.check_model(req.model)
        self._limits.check_chat(req)
        prompt = requests.chat_prompt(req)
        sampling = requests.chat_sampling(req)
        rid = f"chatcmpl-{request_id}"
        primed = await self.start(
            [prompt], sampling, rid, req.stream, tools=requests.chat_tools(req), caller=caller
        )
        created = int(time.time())
        echo = _chat_echo(req)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._chat_stream(rid, created, model, primed, sampling.n, include_usage, echo)
        states, used = await self.collect(primed, sampling.n)
        prompt_logprobs = primed[0][0].prompt_logprobs
        return chat_response(
            rid, created, model, states, used, echo=echo, prompt_logprobs=prompt_logprobs
        )

    async def create_completion(
        self, req: CompletionRequest, request_id: str, caller: Caller | None = None
    ) -> CompletionResponse | AsyncIterator[str]:
        """Run one completions request (one or several prompts)."""
        model = self.check_model(req.model)
        self._limits.check_completion(req)
        prompts = requests.completion_prompts(req.prompt)
        sampling = requests.completion_sampling(req)
        rid = f"cmpl-{request_id}"
        primed = await self.start(prompts, sampling, rid, req.stream, caller=caller)
        created = int(time.time())
        echoes = await self._echoes(req, prompts, primed) if req.echo else []
        top_n = req.logprobs or 0
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._completion_stream(
                rid, created, model, primed, sampling.n, include_usage, echoes, top_n
            )
        states, used = await self.collect(primed, sampling.n)
        prompt_logprobs = [primed[i // sampling.n][0].prompt_logprobs for i in range(len(states))]
        return completion_response(
            rid,
            created,
            model,
            states,
            used,
            echoes=echoes,
            prompt_logprobs=prompt_logprobs,
            top_n=top_n,
        )

    async def _echoes(
        self,
        req: CompletionRequest,
        prompts: Sequence[TextPrompt | TokenPrompt],
        primed: list[Primed],
    ) -> list[Echo | None]:
        """Per choice: the prompt's text and the logprobs of the prompt the engine read."""
        out: list[Echo | None] = []
        for prompt, (first, _) in zip(prompts, primed, strict=True):
            if isinstance(prompt, TextPrompt):
                text = prompt.text
            else:
                text = await self._engine.detokenize(prompt.token_ids)
            echo = Echo(text, first.prompt_logprobs, only_prompt=req.max_tokens == 0)
            out += [echo] * req.n
        return out

    async def start(
        self,
        prompts: Sequence[ChatPrompt | TextPrompt | TokenPrompt],
        sampling: SamplingOptions,
        rid: str,
        stream: bool,
        *,
        tools: ToolOptions | None = None,
        caller: Caller | None = None,
    ) -> list[Primed]:
        """Guard every prompt, start the engine on all at once and wait for each first chunk."""

        async def prime(i: int, prompt: ChatPrompt | TextPrompt | TokenPrompt) -> Primed:
            sub_id = rid if len(prompts) == 1 else f"{rid}-{i}"
            guarded = await self._guard.protect(prompt, sub_id, caller)
            self._metrics.observe_admission()
            if guarded.offsets and sampling.logprobs is not None:
                # vLLM reports logprobs before logits processors run (and an upstream only has
                # the big model's): they would show the very answer the offset steers away from.
                raise InvalidRequestError(
                    "logprobs are not available for requests answered in δ mode: the engine's "
                    "logprobs are taken before the offset is added and would reveal what the "
                    "model is meant to forget",
                    param="logprobs",
                )
            if guarded.offsets and sampling.prompt_logprobs is not None:
                raise InvalidRequestError(
                    "prompt logprobs are not available for requests answered in δ mode",
                    param="prompt_logprobs",
                )
            request = GenerationRequest(
                sub_id, guarded.prompt, sampling, stream, offsets=guarded.offsets, tools=tools
            )
            iterator = aiter(self._output.generate(prompt, guarded, request, caller))
            try:
                return await anext(iterator), iterator
            except BaseException:
                await _close(iterator)
                raise

        if len(prompts) == 1:
            return [await prime(0, prompts[0])]
        results = await asyncio.gather(
            *(prime(i, p) for i, p in enumerate(prompts)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for r in results:
                if not isinstance(r, BaseException):
                    await _close(r[1])
            raise failures[0]
        return [r for r in results if not isinstance(r, BaseException)]

    async def _chat_stream(
        self,
        rid: str,
        created: int,
        model: str,
        primed: list[Primed],
        n: int,
        include_usage: bool,
        echo: str = "",
    ) -> AsyncIterator[str]:
        for index in range(n * len(primed)):
            yield chat_chunk(rid, created, model, role_for=index)
        if echo:
            for index in range(n * len(primed)):
                yield chat_chunk(rid, created, model, role_for=index, text=echo)
        tally = Tally(len(primed))
        async for item in stream_all(primed, n, tally):
            if isinstance(item, GatewayError):
                yield error_sse(item)
                break
            yield chat_chunk(rid, created, model, item)
        else:
            if include_usage:
                yield chat_chunk(rid, created, model, usage=tally.usage())
        self._metrics.count_tokens(tally.prompt_tokens, tally.completion_tokens)
        yield DONE

    async def _completion_stream(
        self,
        rid: str,
        created: int,
        model: str,
        primed: list[Primed],
        n: int,
        include_usage: bool,
        echoes: Sequence[Echo | None] = (),
        top_n: int = 0,
    ) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        tally = Tally(len(primed))
        async for item in stream_all(primed, n, tally):
            if isinstance(item, GatewayError):
                yield error_sse(item)
                break
            echo = echoes[item.index] if item.index < len(echoes) else None
            if echo is not None and item.index in echoed:
                if echo.only_prompt:
                    continue  # max_tokens=0: nothing generated is shown
                echo = None
            elif echo is not None:
                echoed.add(item.index)
                if echo.only_prompt:
                    item = replace(
                        item, text="", logprobs=[] if item.logprobs is not None else None
                    )
            start = offsets.get(item.index, 0)
            shown = (echo.text if echo else "") + item.text
            offsets[item.index] = start + len(shown)
            yield completion_chunk(rid, created, model, item, offset=start, echo=echo, top_n=top_n)
        else:
            if include_usage:
                yield completion_chunk(rid, created, model, None, usage=tally.usage())
        self._metrics.count_tokens(tally.prompt_tokens, tally.completion_tokens)
        yield DONE

    async def collect(
        self, primed: list[Primed], n: int
    ) -> tuple[dict[int, ChoiceState], UsageInfo]:
        """Every choice's whole answer and the request's usage."""
        states: dict[int, ChoiceState] = {}
        tally = Tally(len(primed))
        async for item in stream_all(primed, n, tally):
            if isinstance(item, GatewayError):
                raise item
            states.setdefault(item.index, ChoiceState()).add(item)
        for index in range(n * len(primed)):
            states.setdefault(index, ChoiceState())
        self._metrics.count_tokens(tally.prompt_tokens, tally.completion_tokens)
        return states, tally.usage()


def _chat_echo(req: ChatCompletionRequest) -> str:
    """vLLM's chat echo: the last message's text, when it has the answer's role."""
    if not req.echo:
        return ""
    role = "assistant" if req.add_generation_prompt else req.messages[-1].role
    last = req.messages[-1]
    return last.text() if last.role == role else ""


class Tally:
    """Token counts of one client request, summed over its prompts."""

    def __init__(self, prompts: int) -> None:
        self._prompt = [0] * prompts
        self._completion = [0] * prompts

    def update(self, slot: int, chunk: GenerationChunk) -> None:
        self._prompt[slot] = chunk.prompt_tokens
        self._completion[slot] = chunk.completion_tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(self._prompt)

    @property
    def completion_tokens(self) -> int:
        return sum(self._completion)

    def usage(self) -> UsageInfo:
        return usage(self.prompt_tokens, self.completion_tokens)


async def stream_all(
    primed: list[Primed], n: int, tally: Tally
) -> AsyncIterator[ChoiceDelta | GatewayError]:
    """Merge the prompts' streams; choice i of prompt p becomes index p * n + i.

    A GatewayError raised mid-stream is yielded (not raised) so a stream can end with an
    error event; the other prompts' engine requests are closed (aborted).
    """
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(slot: int, first: GenerationChunk, rest: AsyncIterator[GenerationChunk]) -> None:
        try:
            await queue.put((slot, first))
            async for chunk in rest:
                await queue.put((slot, chunk))
            await queue.put((slot, None))
        except Exception as e:  # handed to the consumer, which decides
            await queue.put((slot, e))

    if len(primed) == 1:  # the common case: no tasks, no queue
        first, rest = primed[0]
        try:
            chunk = first
            while True:
                tally.update(0, chunk)
                for delta in chunk.choices:
                    yield delta
                chunk = await anext(rest)
        except StopAsyncIteration:
            return
        except GatewayError as e:
            yield e
            return
        finally:
            await _close(rest)
    tasks = [asyncio.create_task(pump(i, f, r)) for i, (f, r) in enumerate(primed)]
    live = len(tasks)
    try:
        while live:
            slot, item = await queue.get()
            if item is None:
                live -= 1
                continue
            if isinstance(item, BaseException):
                if isinstance(item, GatewayError):
                    yield item
                    return
                raise item
            tally.update(slot, item)
            for delta in item.choices:
                delta.index += slot * n
                yield delta
    finally:
        for task in tasks:
            task.cancel()
        # A pump may be inside anext(); let the cancellations land before closing the iterators.
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, iterator in primed:
            await _close(iterator)


async def _close(iterator: AsyncIterator[GenerationChunk]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
