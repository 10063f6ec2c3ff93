"""Engine deltas -> OpenAI responses and SSE chunks (the shapes vLLM's server emits)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine import ChoiceDelta, TokenLogprob
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
)
from server.protocol.common import UsageInfo, dump
from server.protocol.completion import CompletionChoice, CompletionLogprobs, CompletionResponse

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, object]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class ChoiceState:
    """What one choice has produced so far (for non-streaming responses)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


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
    entries: Sequence[TokenLogprob] | None, start: int
) -> CompletionLogprobs | None:
    """Engine logprobs -> the legacy completions `logprobs` object, offsets from `start`."""
    if entries is None:
        return None
    offsets, offset = [], start
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        text_offset=offsets,
        token_logprobs=[e.logprob for e in entries],
        tokens=[e.token for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries],
    )


def chat_response(
    rid: str, created: int, model: str, states: dict[int, ChoiceState], usage: UsageInfo
) -> ChatCompletionResponse:
    """The non-streaming chat response."""
    return ChatCompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            ChatCompletionChoice(
                index=i,
                message=ChatResponseMessage(content="".join(s.text)),
                logprobs=chat_logprobs(s.logprobs),
                finish_reason=s.finish_reason or "stop",
                stop_reason=s.stop_reason,
            )
            for i, s in sorted(states.items())
        ],
        usage=usage,
    )


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: ChoiceDelta | None = None,
    *,
    role_for: int | None = None,
    usage: UsageInfo | None = None,
) -> str:
    """One chat SSE event: the role opener, a content delta, or the usage-only tail."""
    choices: list[ChatChunkChoice] = []
    if role_for is not None:
        choices.append(
            ChatChunkChoice(index=role_for, delta=ChatDelta(role="assistant", content=""))
        )
    elif delta is not None:
        choices.append(
            ChatChunkChoice(
                index=delta.index,
                delta=ChatDelta(content=delta.text),
                logprobs=chat_logprobs(delta.logprobs),
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )
        )
    chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
    return sse(dump(chunk))


def completion_response(
    rid: str, created: int, model: str, states: dict[int, ChoiceState], usage: UsageInfo
) -> CompletionResponse:
    """The non-streaming completions response."""
    return CompletionResponse(
        id=rid,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text="".join(s.text),
                logprobs=completion_logprobs(s.logprobs, 0),
                finish_reason=s.finish_reason or "stop",
                stop_reason=s.stop_reason,
            )
            for i, s in sorted(states.items())
        ],
        usage=usage,
    )


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    delta: ChoiceDelta | None,
    *,
    offset: int = 0,
    usage: UsageInfo | None = None,
) -> str:
    """One completions SSE event (a text delta, or the usage-only tail)."""
    choices = []
    if delta is not None:
        choices.append(
            CompletionChoice(
                index=delta.index,
                text=delta.text,
                logprobs=completion_logprobs(delta.logprobs, offset),
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )
        )
    chunk = CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage)
    return sse(dump(chunk))
