"""The Responses API (/v1/responses): request, response object, output items, usage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from server.protocol.chat import TEXT_PARTS
from server.protocol.common import OpenAIBaseModel, StrictModel
from server.protocol.structured import StructuredOutputs


class ResponseJsonSchema(OpenAIBaseModel):
    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseTextFormat(OpenAIBaseModel):
    type: Literal["text", "json_object"]


class TextConfig(OpenAIBaseModel):
    """`text.format`: plain text, any JSON object, or JSON validating against a schema."""

    format: ResponseTextFormat | ResponseJsonSchema | None = None


class FunctionTool(OpenAIBaseModel):
    """A function the model may call (the only tool type served here)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(OpenAIBaseModel):
    type: Literal["function"]
    name: str


class Reasoning(OpenAIBaseModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="Passed to the chat template as vLLM does."
    )


class ResponsesStreamOptions(OpenAIBaseModel):
    include_obfuscation: bool | None = Field(
        None, description="Accepted: this server never adds obfuscation padding to events."
    )


# Input item kinds read here (vLLM: vllm/entrypoints/openai/responses/utils.py).
INPUT_ITEM_TYPES = ("message", "function_call", "function_call_output")
# The fields each kind may carry; any other is refused by name, not ignored (`id` and `status`
# are the item's bookkeeping as OpenAI returns it; a part's annotations and logprobs likewise).
_ITEM_FIELDS = {
    "message": frozenset({"type", "role", "content", "id", "status"}),
    "function_call": frozenset({"type", "call_id", "name", "arguments", "id", "status"}),
    "function_call_output": frozenset({"type", "call_id", "output", "id", "status"}),
}
_PART_FIELDS = frozenset({"type", "text", "refusal", "annotations", "logprobs"})


class ResponsesRequest(OpenAIBaseModel):
    input: str | list[dict[str, Any]]
    model: str | None = None
    include: list[Literal["message.output_text.logprobs"]] | None = Field(
        None, description="Only output logprobs: no built-in tools, images or reasoning here."
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = Field(
        None, max_length=16, description="Returned in the response object, as vLLM does."
    )
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = Field(
        None, description="Accepted: vLLM caches shared prefixes on its own."
    )
    reasoning: Reasoning | None = None
    safety_identifier: str | None = Field(None, description="Written to the audit log.")
    service_tier: Literal["auto", "default"] | None = None
    store: Literal[False] | None = Field(
        None, description="Only false: nothing is stored on this server."
    )
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    tools: list[FunctionTool] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0, le=1)
    truncation: Literal["disabled"] | None = Field(
        None, description="Only disabled: the guard reads the whole input."
    )
    user: str | None = Field(None, description="Written to the audit log.")

    # --- Extras beyond the OpenAI API (vLLM names) ---
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputs | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("input")
    @classmethod
    def _items(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, str):
            return value
        for i, item in enumerate(value):
            kind = item.get("type", "message" if "role" in item else None)
            if kind not in INPUT_ITEM_TYPES:
                raise ValueError(
                    f"input[{i}]: items of type {kind!r} are not supported here "
                    f"(supported: {', '.join(INPUT_ITEM_TYPES)})"
                )
            unknown = sorted(set(item) - _ITEM_FIELDS[kind])
            if unknown:
                raise ValueError(f"input[{i}]: unknown fields {unknown} in a {kind!r} item")
            if kind == "message":
                _check_message(i, item)
            elif kind == "function_call":
                for key in ("call_id", "name", "arguments"):
                    if not isinstance(item.get(key), str):
                        raise ValueError(f"input[{i}]: a function_call needs a string {key!r}")
            elif not isinstance(item.get("call_id"), str):
                raise ValueError(f"input[{i}]: a function_call_output needs a string 'call_id'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ResponsesRequest:
        if self.structured_outputs is not None and self.text and self.text.format:
            raise ValueError("Cannot specify both structured_outputs and text.format")
        if self.tools == []:
            self.tools = None
        return self


def _check_message(i: int, item: dict[str, Any]) -> None:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise ValueError(f"input[{i}]: unsupported role {role!r}")
    content = item.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"input[{i}]: content must be a string or a list of parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if key is None:
            raise ValueError(
                f"input[{i}].content[{j}]: content parts of type {kind!r} are not supported: "
                f"the served model reads text only"
            )
        if not isinstance(part.get(key), str):
            raise ValueError(f"input[{i}].content[{j}]: a {kind!r} part needs a string {key!r}")
        unknown = sorted(set(part) - _PART_FIELDS)
        if unknown:
            raise ValueError(f"input[{i}].content[{j}]: unknown fields {unknown} in a part")


class TopLogprob(StrictModel):
    token: str
    logprob: float
    bytes: list[int]


class OutputLogprob(StrictModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class OutputText(StrictModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[OutputLogprob] | None = None


class OutputMessage(StrictModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallItem(StrictModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(StrictModel):
    cached_tokens: int = 0


class OutputTokensDetails(StrictModel):
    reasoning_tokens: int = 0


class ResponseUsage(StrictModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(StrictModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(StrictModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any] | None = None
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
