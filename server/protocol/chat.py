"""Chat completions: request, response and stream chunk models (OpenAI field order)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from server.protocol.common import (
    ChatMessageParam,
    OpenAIBaseModel,
    StreamOptions,
    StrictModel,
    ToolCallParam,
    UsageInfo,
)
from server.protocol.structured import ResponseFormat, StructuredOutputs

Role = Literal["system", "developer", "user", "assistant", "tool"]

# Content parts whose text the chat template reads, and the key holding it (as vLLM reads them).
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


class FunctionCallArg(OpenAIBaseModel):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCallArg(OpenAIBaseModel):
    """A tool call in an assistant turn the client sends back (OpenAI's shape)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallArg


class ChatMessage(OpenAIBaseModel):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallArg] | None = None
    tool_call_id: str | None = None
    refusal: str | None = Field(
        None, description="An earlier refusal: only null is accepted (templates never read it)."
    )

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
            key = TEXT_PARTS.get(kind) if isinstance(kind, str) else None
            if key is None:
                raise ValueError(
                    f"content parts of type {kind!r} are not supported: the served model reads "
                    f"text only ({', '.join(sorted(TEXT_PARTS))} parts)"
                )
            if not isinstance(part.get(key), str):
                raise ValueError(f"a {kind!r} content part needs a string {key!r}")
        return value

    @field_validator("refusal")
    @classmethod
    def _no_refusal_text(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "an assistant `refusal` is not read by the chat template; send it as content"
            )
        return value

    @model_validator(mode="after")
    def _fields_match_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls are only allowed in assistant messages")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id is only allowed in tool messages")
        return self

    def parts(self) -> list[str] | None:
        """The text of each content part (None for string content, [] for none)."""
        if self.content is None:
            return []
        if isinstance(self.content, list):
            return [part[TEXT_PARTS[part["type"]]] for part in self.content]
        return None

    def text(self) -> str:
        """The content as vLLM hands it to a text template: text parts joined by newlines."""
        parts = self.parts()
        return "\n".join(parts) if parts is not None else str(self.content)

    def to_param(self) -> ChatMessageParam:
        """The turn as the engine and the guard read it (role as sent, text, tool fields)."""
        param: ChatMessageParam = {"role": self.role, "content": self.text()}
        parts = self.parts()
        if parts is not None:
            param["parts"] = parts
        if self.name is not None:
            param["name"] = self.name
        if self.tool_calls:
            param["tool_calls"] = [_tool_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            param["tool_call_id"] = self.tool_call_id
        return param


def _tool_call(call: ToolCallArg) -> ToolCallParam:
    arguments = call.function.arguments
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIBaseModel):
    """A tool the model may call (`type: function`, the only kind vLLM's chat serves)."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(OpenAIBaseModel):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    modalities: list[Literal["text"]] | None = Field(
        None, description="Only text: the served model neither reads nor writes audio."
    )
    n: int = Field(1, ge=1, le=64)
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    prompt_cache_key: str | None = Field(
        None, description="Accepted: vLLM caches shared prefixes on its own."
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="Passed to the chat template as vLLM does."
    )
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = Field(None, description="Written to the audit log.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    service_tier: Literal["auto", "default"] | None = Field(
        None, description="One tier here: `auto` and `default` are accepted, others refused."
    )
    stop: str | list[str] | None = None
    store: Literal[False] | None = Field(
        None, description="Only false: nothing is stored on this server."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    tool_choice: ToolChoice | None = None
    tools: list[ToolDefinition] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = Field(None, description="Written to the audit log.")

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
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's structured-output constraints (json, regex, choice, grammar)."
    )
    echo: bool = Field(False, description="Prepend the last message when it has the reply's role.")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Extra variables for the chat template."
    )
    documents: list[dict[str, str]] | None = Field(
        None, description="RAG documents handed to templates that read them."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        if self.tools == []:
            raise ValueError("`tools` must not be an empty array")
        return self


class ResponseFunctionCall(StrictModel):
    name: str
    arguments: str


class ResponseToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(StrictModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None

    @model_serializer(mode="wrap")
    def _no_empty_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)  # absent, as vLLM and OpenAI send a plain answer
        return data


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
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class DeltaFunctionCall(StrictModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(StrictModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatDelta(StrictModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _no_empty_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


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
