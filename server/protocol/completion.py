"""Legacy completions: request, response and stream chunk models (OpenAI field order)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from server.protocol.common import OpenAIBaseModel, StreamOptions, StrictModel, UsageInfo
from server.protocol.structured import ResponseFormat, StructuredOutputs

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(OpenAIBaseModel):
    model: str
    prompt: PromptInput
    best_of: int | None = Field(
        None, ge=1, le=1, description="Only 1: each of the n choices is returned as sampled."
    )
    echo: bool = Field(
        False, description="Prepend the prompt (and, with logprobs, the prompt's logprobs)."
    )
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=0, description="0: with echo, only the prompt.")
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
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end the answer.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    spaces_between_special_tokens: bool = True
    bad_words: list[str] | None = Field(None, description="Words never generated.")
    allowed_token_ids: list[int] | None = Field(None, description="Only these tokens.")
    prompt_logprobs: int | None = Field(
        None, ge=-1, description="Logprobs of the prompt's tokens as the engine read them."
    )
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's structured-output constraints (json, regex, choice, grammar)."
    )

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("prompt must not contain an empty token list")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _default_max_tokens(cls, value: int | None) -> int:
        return 16 if value is None else value  # null means OpenAI's default, as vLLM reads it

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only allowed with echo (the prompt alone)")
        if self.stream and self.prompt_logprobs not in (None, 0):
            raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
        return self

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
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(StrictModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
