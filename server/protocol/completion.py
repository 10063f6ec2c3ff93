"""Legacy completions: request, response and stream chunk models (OpenAI field order)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from server.protocol.common import OpenAIBaseModel, StreamOptions, StrictModel, UsageInfo

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(OpenAIBaseModel):
    model: str
    prompt: PromptInput
    echo: bool = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1, le=64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None

    # --- Extras beyond the OpenAI API (vLLM names) ---
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens (-1/0: all).")
    min_p: float | None = Field(None, ge=0, le=1, description="Minimum probability, relative.")
    repetition_penalty: float | None = Field(None, gt=0, description="> 1 discourages repeats.")
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("prompt must not contain an empty token list")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by this model")
        return value


class CompletionLogprobs(StrictModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(StrictModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class CompletionResponse(StrictModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
