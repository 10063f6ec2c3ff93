"""A scripted engine for fast unit tests: records every request, answers from a queue.

It implements the real `Engine` protocol; every behaviour the product promises is also tested on
the real vLLM engine (tests/e2e).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from server.engine.base import (
    ChatPrompt,
    ChoiceDelta,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    PromptEmbeds,
    PromptLogprob,
    RenderedPrompt,
    TextPrompt,
    TokenLogprob,
    TokenPrompt,
    ToolCallDelta,
    TopLogprob,
    joined_deltas,
)
from server.errors import ContextLengthError, GatewayError, InvalidRequestError


@dataclass(frozen=True)
class FakeToolCall:
    """A queued reply that is one tool call (sent as one piece, finish_reason `tool_calls`)."""

    name: str
    arguments: str


class FakeEngine:
    """Answers with queued texts (default: "ok"), one word per token."""

    def __init__(self, model_id: str = "fake-model", max_model_len: int = 256) -> None:
        self._card = ModelCard(id=model_id, max_model_len=max_model_len, root="fake")
        self._ready = False
        self.history: list[GenerationRequest] = []
        self._queue: deque[str | GatewayError | FakeToolCall] = deque()
        self._running = 0
        self.alternatives: dict[str, tuple[str, ...]] = {}
        """More top_logprobs alternatives of a token, by its text (" British": (" Rowling",))."""
        self.prompt_alternatives: dict[str, tuple[str, ...]] = {}
        """More prompt_logprobs alternatives of a prompt token (a character), by its text, for
        prompts sent as text or token ids (corrupted embeddings no longer predict them)."""

    @property
    def model(self) -> ModelCard:
        return self._card

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def running(self) -> int:
        return self._running

    def enqueue(self, *replies: str | GatewayError | FakeToolCall) -> None:
        """Queue replies; a GatewayError is raised mid-stream after the first token."""
        self._queue.extend(replies)

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    def render(self, prompt: ChatPrompt | TextPrompt) -> RenderedPrompt:
        if isinstance(prompt, ChatPrompt):
            text = (
                "".join(f"<{m['role']}>{m['content']}\n" for m in prompt.messages) + "<assistant>"
            )
        else:
            text = prompt.text
        return RenderedPrompt(text=text, token_ids=[ord(c) for c in text])

    async def tokenize(
        self,
        prompt: ChatPrompt | TextPrompt,
        add_special_tokens: bool | None = None,
        token_strs: bool = False,
    ) -> RenderedPrompt:
        rendered = self.render(prompt)
        if token_strs:
            rendered = replace(rendered, token_strs=[_text(i) for i in rendered.token_ids])
        return rendered

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        if any(i >= 0x110000 for i in token_ids):
            raise InvalidRequestError("token id outside the vocabulary", param="tokens")
        return "".join(_text(i) for i in token_ids)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        p = request.prompt
        if isinstance(p, TokenPrompt | PromptEmbeds):
            return list(p.token_ids)
        return self.render(p).token_ids

    def _prompt_len(self, request: GenerationRequest) -> int:
        p = request.prompt
        if isinstance(p, TokenPrompt | PromptEmbeds):
            return len(p.token_ids)
        return len(self.render(p).token_ids)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.history.append(request)
        prompt_len = self._prompt_len(request)
        limit = self._card.max_model_len or 0
        if prompt_len >= limit:
            raise ContextLengthError(f"This model's maximum context length is {limit} tokens")
        reply = self._queue.popleft() if self._queue else "ok"
        self._running += 1
        try:
            if isinstance(reply, FakeToolCall):
                call = ToolCallDelta(0, f"call-{reply.name}", reply.name, reply.arguments)
                delta = ChoiceDelta(0, "", [0], None, "tool_calls", tool_calls=[call])
                delta.null_content = True
                yield GenerationChunk([delta], prompt_len, 1)
                return
            error = reply if isinstance(reply, GatewayError) else None
            words = ["fake"] if error else str(reply).split(" ")
            max_tokens = request.sampling.max_tokens or len(words)
            first = True
            chunks = self._emit(request, words, max_tokens, prompt_len, error)
            every = request.stream_every if request.stream else 1
            async for chunk in _grouped(chunks, every) if every > 1 else chunks:
                if first and request.sampling.prompt_logprobs is not None:
                    ids = self._prompt_ids(request)
                    chunk.prompt_token_ids = ids
                    more = (
                        {} if isinstance(request.prompt, PromptEmbeds) else self.prompt_alternatives
                    )
                    chunk.prompt_logprobs = [
                        PromptLogprob(t, _text(t), None, None)
                        if i == 0
                        else PromptLogprob(
                            t,
                            _text(t),
                            -1.0,
                            1,
                            (
                                (t, _text(t), -1.0, 1),
                                *(
                                    (-1, a, -2.0 - k, 2 + k)
                                    for k, a in enumerate(more.get(_text(t), ()))
                                ),
                            ),
                        )
                        for i, t in enumerate(ids)
                    ]
                first = False
                yield chunk
        finally:
            self._running -= 1

    async def _emit(
        self,
        request: GenerationRequest,
        words: list[str],
        max_tokens: int,
        prompt_len: int,
        error: GatewayError | None,
    ) -> AsyncIterator[GenerationChunk]:
        completion = 0
        sampling = request.sampling
        for index in range(request.sampling.n):
            written = ""
            for i, word in enumerate(words[:max_tokens]):
                piece = word if i == 0 else " " + word
                last = i == min(len(words), max_tokens) - 1
                completion += 1
                hit = _stop_hit(written + piece, sampling.stop) if not error else None
                if hit is not None:  # as vLLM: the text ends before the stop string (or with it)
                    at, stop = hit
                    end = at + (len(stop) if sampling.include_stop_str_in_output else 0)
                    delta = ChoiceDelta(
                        index, (written + piece)[len(written) : end], [i], None, "stop", stop
                    )
                    yield GenerationChunk([delta], prompt_len, completion)
                    break
                written += piece
                lp = None
                if request.sampling.logprobs is not None:
                    more = self.alternatives.get(piece, ())
                    top = (piece, *more)
                    lp = [
                        TokenLogprob(
                            piece, -0.5, tuple(TopLogprob(t, -0.5 - k) for k, t in enumerate(top))
                        )
                    ]
                finish: FinishReason | None = None
                if last and not error:
                    finish = "length" if max_tokens < len(words) else "stop"
                yield GenerationChunk(
                    [ChoiceDelta(index, piece, [i], lp, finish)], prompt_len, completion
                )
                if error:
                    raise error


async def _grouped(
    chunks: AsyncIterator[GenerationChunk], every: int
) -> AsyncIterator[GenerationChunk]:
    """One-word chunks `every` words at a time, as vLLM's `stream_interval`: each choice's first
    word and its last chunk at once."""
    pending: list[GenerationChunk] = []
    started: set[int] = set()

    def merged() -> GenerationChunk:
        last = pending[-1]
        delta = joined_deltas(last.choices[0].index, [c.choices[0] for c in pending])
        pending.clear()
        return replace(last, choices=[delta])

    async for chunk in chunks:
        (delta,) = chunk.choices
        if pending and pending[-1].choices[0].index != delta.index:
            yield merged()
        pending.append(chunk)
        if delta.index not in started or len(pending) >= every or delta.finish_reason:
            started.add(delta.index)
            yield merged()
    if pending:
        yield merged()


def _stop_hit(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Where the first stop string in `text` starts, and which one."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _text(token_id: int) -> str:
    """The fake's tokens are characters (ids beyond Unicode shown as `<id>`, surrogates as the
    replacement character, as a real tokenizer decodes bytes it cannot)."""
    if 0xD800 <= token_id < 0xE000:
        return "\ufffd"
    return chr(token_id) if 0 <= token_id < 0x110000 else f"<{token_id}>"
