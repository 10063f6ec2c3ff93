"""Chat completions: request, response and stream chunk models (OpenAI field order)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from server.protocol.common import (
    ChatMessageParam,
    OpenAIBaseModel,
    StreamOptions,
    StrictModel,
    UsageInfo,
)

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _only_text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for part in value:
            kind = part.get("type")
            if kind == "prompt_embeds":
                # vLLM can crash on malformed embeddings; only the gateway makes them.
                raise ValueError("prompt_embeds content parts are not accepted from clients")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"unsupported content part type {kind!r}: only 'text' parts")
        return value

    def to_param(self) -> ChatMessageParam:
        """Normalised turn: text parts joined by newlines, `developer` read as `system`."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(OpenAIBaseModel):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None

    # --- Extras beyond the OpenAI API (vLLM names) ---
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens (-1/0: all).")
    min_p: float | None = Field(None, ge=0, le=1, description="Minimum probability, relative.")
    repetition_penalty: float | None = Field(None, gt=0, description="> 1 discourages repeats.")
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens.")


class ChatResponseMessage(StrictModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatTopLogprob(StrictModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(StrictModel):
    content: list[ChatTokenLogprob] | None


class ChatCompletionChoice(StrictModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionResponse(StrictModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class ChatDelta(StrictModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(StrictModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(StrictModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
