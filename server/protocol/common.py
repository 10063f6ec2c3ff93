"""Shared protocol pieces: the lenient base model, usage, and normalised chat messages."""

from __future__ import annotations

import logging
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger(__name__)


class ChatMessageParam(TypedDict):
    """A chat turn after normalisation: text content only, parts joined by newlines."""

    role: str
    content: str


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields (clients send many) and logs the ones it ignores."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored(self) -> OpenAIBaseModel:
        if self.model_extra:
            logger.info(
                "%s: ignoring unknown fields %s",
                type(self).__name__,
                sorted(self.model_extra),
            )
        return self


class StrictModel(BaseModel):
    """Response-side models: exactly the fields we set."""

    model_config = ConfigDict(extra="forbid")


class UsageInfo(StrictModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


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
