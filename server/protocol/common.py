"""Shared protocol pieces: the lenient base model, usage, and normalised chat messages."""

from __future__ import annotations

import logging
from typing import Any, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)


class ToolCallFunctionParam(TypedDict):
    name: str
    arguments: str
    """The arguments as the JSON string the client sent (templates get them parsed)."""


class ToolCallParam(TypedDict):
    """An assistant turn's tool call, in OpenAI's shape."""

    id: str
    type: str
    function: ToolCallFunctionParam


class ChatMessageParam(TypedDict):
    """A chat turn as the engine and the guard read it: the role as sent (`developer`
    included), the text content (text parts joined by newlines, as vLLM joins them), and when
    present the turn's `name`, an assistant turn's `tool_calls` and a tool turn's
    `tool_call_id`."""

    role: str
    content: str
    parts: NotRequired[list[str]]
    """The text of each part when the content was sent as a list of parts ([] for null
    content): templates that loop over parts get them one by one, as vLLM gives them."""
    name: NotRequired[str]
    tool_calls: NotRequired[list[ToolCallParam]]
    tool_call_id: NotRequired[str]


class OpenAIBaseModel(BaseModel):
    """Request-side models: a field this server does not serve is a 400 naming it.

    vLLM's server logs unknown fields and ignores them; a guard cannot: an ignored field is one
    the client believes was honoured (tools that were never offered, a format never enforced).
    Refused OpenAI fields have their reason in `server.protocol.unsupported`.
    """

    model_config = ConfigDict(extra="forbid")


class StrictModel(BaseModel):
    """Response-side models: exactly the fields we set."""

    model_config = ConfigDict(extra="forbid")


class UsageInfo(StrictModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="Only false: usage comes once, in the last chunk (include_usage)."
    )
    include_obfuscation: bool | None = Field(
        None, description="Accepted: this server never adds obfuscation padding to events."
    )

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous_usage(cls, value: bool) -> bool:
        if value:
            raise ValueError("usage on every chunk is not served: use include_usage")
        return value


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    """Usage block for the given counts."""
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def dump(model: BaseModel) -> dict[str, Any]:
    """Serialise a response model the way OpenAI clients expect (nulls kept)."""
    return model.model_dump(mode="json")
