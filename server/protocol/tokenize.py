"""/tokenize and /detokenize (vLLM's endpoints next to /v1): request and response models."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from server.protocol.chat import ChatMessage, ToolDefinition
from server.protocol.common import OpenAIBaseModel, StrictModel


class TokenizeRequest(OpenAIBaseModel):
    """A text prompt (`prompt`) or a conversation (`messages`, templated as for chat)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = Field(
        None, description="Default: on for a prompt, off for messages (the template adds them)."
    )
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        return self


class TokenizeResponse(StrictModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]]


class DetokenizeResponse(StrictModel):
    prompt: str
