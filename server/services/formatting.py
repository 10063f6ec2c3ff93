"""Engine deltas -> OpenAI responses and SSE chunks (the shapes vLLM's server emits)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.engine import ChoiceDelta, PromptLogprob, TokenLogprob, ToolCallDelta
from server.protocol.chat import (
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaFunctionCall,
    DeltaToolCall,
    ResponseFunctionCall,
    ResponseToolCall,
)
from server.protocol.common import UsageInfo, dump
from server.protocol.completion import CompletionChoice, CompletionLogprobs, CompletionResponse

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, object]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class ToolCallState:
    """One tool call put together from its streamed pieces."""

    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


@dataclass
class ChoiceState:
    """What one choice has produced so far (for non-streaming responses)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    tool_calls: dict[int, ToolCallState] = field(default_factory=dict)
    null_content: bool = True
    """Every delta said its content was null (an answer that is only tool calls)."""

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        self.null_content = self.null_content and delta.null_content
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        for piece in delta.tool_calls or ():
            call = self.tool_calls.setdefault(piece.index, ToolCallState())
            call.id = call.id or piece.id
            call.name = call.name or piece.name
            if piece.arguments:
                call.arguments.append(piece.arguments)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason

    @property
    def content(self) -> str | None:
        text = "".join(self.text)
        return None if self.tool_calls and self.null_content and not text else text

    def calls(self) -> list[ResponseToolCall] | None:
        """The whole tool calls, in index order (None when there are none)."""
        if not self.tool_calls:
            return None
        return [
            ResponseToolCall(
                id=c.id or "",
                function=ResponseFunctionCall(name=c.name or "", arguments="".join(c.arguments)),
            )
            for _, c in sorted(self.tool_calls.items())
        ]


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
    """Engine logprobs -> the chat `logprobs.content` list."""
    if entries is None:
        return None
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=_token_bytes(e.token),
                top_logprobs=[
                    ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=_token_bytes(t.token))
                    for t in e.top
                ],
            )
            for e in entries
        ]
    )


def completion_logprobs(
    entries: Sequence[TokenLogprob] | None,
    start: int,
    prompt: Sequence[PromptLogprob] | None = None,
    top_n: int = 0,
) -> CompletionLogprobs | None:
    """Engine logprobs -> the legacy completions `logprobs` object, offsets from `start`;
    with echo, the prompt's tokens come first (each with its own token and `top_n` others)."""
    if entries is None:
        return None
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    for p in prompt or ():
        tokens.append(p.token)
        values.append(p.logprob)
        tops.append(None if p.logprob is None else {t[1]: t[2] for t in p.top[: top_n + 1]})
    for e in entries:
        tokens.append(e.token)
        values.append(e.logprob)
        tops.append({t.token: t.logprob for t in e.top})
    offsets, offset = [], start
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        text_offset=offsets, token_logprobs=values, tokens=tokens, top_logprobs=tops
    )


def prompt_logprobs_field(entries: Sequence[PromptLogprob] | None) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs` field: per prompt token, token id -> logprob, rank, text."""
    return [
        None
        if p.logprob is None
        else {
            str(tid): {"logprob": lp, "rank": rank, "decoded_token": text}
            for tid, text, lp, rank in p.top
        }
        for p in entries or ()
    ]


def delta_tool_calls(pieces: Sequence[ToolCallDelta] | None) -> list[DeltaToolCall] | None:
    """Streamed tool-call pieces in OpenAI's chunk shape."""
    if not pieces:
        return None
    return [
        DeltaToolCall(
            index=p.index,
            id=p.id,
            type="function" if p.id is not None else None,
            function=DeltaFunctionCall(name=p.name, arguments=p.arguments),
        )
        for p in pieces
    ]


def chat_response(
    rid: str,
    created: int,
    model: str,
    states: dict[int, ChoiceState],
    usage: UsageInfo,
    *,
    echo: str = "",
    prompt_logprobs: Sequence[PromptLogprob] | None = None,
) -> ChatCompletionResponse:
    """The non-streaming chat response (`echo`: text put before every answer)."""
    return ChatCompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            ChatCompletionChoice(
                index=i,
                message=ChatResponseMessage(
                    content=echo + (s.content or "") if echo else s.content,
                    tool_calls=s.calls(),
                ),
                logprobs=chat_logprobs(s.logprobs),
                finish_reason=s.finish_reason or "stop",
                stop_reason=s.stop_reason,
            )
            for i, s in sorted(states.items())
        ],
        usage=usage,
        prompt_logprobs=(
            prompt_logprobs_field(prompt_logprobs) if prompt_logprobs is not None else None
        ),
    )


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: ChoiceDelta | None = None,
    *,
    role_for: int | None = None,
    usage: UsageInfo | None = None,
    text: str | None = None,
) -> str:
    """One chat SSE event: the role opener (or, with `text`, an echoed prefix for that index),
    a content/tool-call delta, or the usage-only tail."""
    choices: list[ChatChunkChoice] = []
    if role_for is not None:
        opener = (
            ChatDelta(role="assistant", content="") if text is None else ChatDelta(content=text)
        )
        choices.append(ChatChunkChoice(index=role_for, delta=opener))
    elif delta is not None:
        choices.append(
            ChatChunkChoice(
                index=delta.index,
                delta=ChatDelta(
                    content=None if delta.null_content else delta.text,
                    tool_calls=delta_tool_calls(delta.tool_calls),
                ),
                logprobs=chat_logprobs(delta.logprobs),
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )
        )
    chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
    return sse(dump(chunk))


@dataclass(frozen=True)
class Echo:
    """What a completions choice repeats of its prompt (echo), and the prompt's logprobs."""

    text: str = ""
    logprobs: Sequence[PromptLogprob] | None = None
    only_prompt: bool = False
    """max_tokens=0: the prompt alone, nothing generated is shown."""


def completion_response(
    rid: str,
    created: int,
    model: str,
    states: dict[int, ChoiceState],
    usage: UsageInfo,
    *,
    echoes: Sequence[Echo | None] = (),
    prompt_logprobs: Sequence[Sequence[PromptLogprob] | None] = (),
    top_n: int = 0,
) -> CompletionResponse:
    """The non-streaming completions response (`echoes`/`prompt_logprobs`: per choice)."""
    choices = []
    for i, s in sorted(states.items()):
        echo = echoes[i] if i < len(echoes) else None
        prompt = prompt_logprobs[i] if i < len(prompt_logprobs) else None
        text = "".join(s.text)
        logprobs = completion_logprobs(s.logprobs, 0)
        if echo is not None:
            generated = [] if echo.only_prompt else (s.logprobs or [])
            text = echo.text + ("" if echo.only_prompt else text)
            if s.logprobs is not None:
                logprobs = completion_logprobs(generated, 0, echo.logprobs or (), top_n)
        choices.append(
            CompletionChoice(
                index=i,
                text=text,
                logprobs=logprobs,
                finish_reason=s.finish_reason or "stop",
                stop_reason=s.stop_reason,
                prompt_logprobs=prompt_logprobs_field(prompt) if prompt is not None else None,
            )
        )
    return CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage)


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    delta: ChoiceDelta | None,
    *,
    offset: int = 0,
    usage: UsageInfo | None = None,
    echo: Echo | None = None,
    top_n: int = 0,
) -> str:
    """One completions SSE event (a text delta, with `echo` the prompt first, or the tail)."""
    choices = []
    if delta is not None:
        text, logprobs = delta.text, completion_logprobs(delta.logprobs, offset)
        if echo is not None:
            text = echo.text + delta.text
            if delta.logprobs is not None:
                logprobs = completion_logprobs(delta.logprobs, offset, echo.logprobs or (), top_n)
        choices.append(
            CompletionChoice(
                index=delta.index,
                text=text,
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )
        )
    chunk = CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
    return sse(dump(chunk))
