"""Structured outputs: OpenAI's `response_format` and vLLM's `structured_outputs` extra."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from server.protocol.common import OpenAIBaseModel


class JsonSchemaFormat(OpenAIBaseModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    """`text`, `json_object`, or `json_schema` (the answer must validate against the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError(
                "When response_format type is 'json_schema', the 'json_schema' field must be "
                "provided."
            )
        return self


class StructuredOutputs(OpenAIBaseModel):
    """vLLM's constraints: exactly one of json, regex, choice, grammar, json_object."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        kinds = [self.json_, self.regex, self.choice, self.grammar, self.json_object]
        count = sum(k is not None for k in kinds)
        if count != 1:
            raise ValueError(
                "give exactly one kind of structured-output constraint "
                "(json, regex, choice, grammar or json_object)"
            )
        return self


def constraint(
    response_format: ResponseFormat | None, structured: StructuredOutputs | None
) -> dict[str, Any] | None:
    """The engine's structured-output constraint (vLLM `StructuredOutputsParams` keywords):
    `structured_outputs`, with `response_format` overriding its kind, as vLLM merges them."""
    base: dict[str, Any] = (
        structured.model_dump(by_alias=True, exclude_defaults=True) if structured else {}
    )
    if response_format is None or response_format.type == "text":
        return base or None
    for kind in ("json", "regex", "choice", "grammar", "json_object"):
        base.pop(kind, None)
    if response_format.type == "json_object":
        base["json_object"] = True
    else:
        assert response_format.json_schema is not None
        base["json"] = response_format.json_schema.schema_
    return base
