"""Every field of OpenAI's chat, completions and responses requests is served or refused by name.

The fields come from the `openai` package's typed request params, so a field the SDK gains
fails this test until it is classified here: either a case that shows it reaches the engine
(or the response) or a 400 whose `param` names it. vLLM's own request fields are checked the
same way (declared here and served, or refused by name).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.engine import ChatPrompt, GenerationRequest
from server.engine.fake import FakeEngine
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completion import CompletionRequest
from server.protocol.responses import ResponsesRequest
from server.services.guard import Guarded
from server.services.tenancy import Caller

MODEL = "fake-model"
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
RTOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


@dataclass
class RecordingGuard:
    """Passes every prompt through and records who asked (the caller reaches the guard)."""

    calls: list[tuple[Any, Caller | None]] = field(default_factory=list)

    async def protect(self, prompt: Any, request_id: str, caller: Caller | None = None) -> Guarded:
        self.calls.append((prompt, caller))
        return Guarded(prompt)


@pytest.fixture
def fake_engine(light_engine: FakeEngine) -> FakeEngine:
    return light_engine


@pytest.fixture
def client(light_client: TestClient) -> TestClient:
    return light_client


@pytest.fixture
def guard(client) -> RecordingGuard:
    recording = RecordingGuard()
    client.app.state.generation._guard = recording
    return recording


Check = Callable[[GenerationRequest, dict[str, Any], RecordingGuard], None]


def sent(engine: FakeEngine) -> GenerationRequest:
    return engine.history[-1]


def sampling(name: str, value: Any) -> Check:
    def check(req: GenerationRequest, body: dict[str, Any], guard: RecordingGuard) -> None:
        assert getattr(req.sampling, name) == value, (name, getattr(req.sampling, name))

    return check


def kwarg(name: str, value: Any) -> Check:
    def check(req: GenerationRequest, body: dict[str, Any], guard: RecordingGuard) -> None:
        assert isinstance(req.prompt, ChatPrompt)
        assert req.prompt.template_kwargs[name] == value

    return check


def end_user(value: str) -> Check:
    def check(req: GenerationRequest, body: dict[str, Any], guard: RecordingGuard) -> None:
        assert guard.calls[-1][1] is not None and guard.calls[-1][1].end_user == value

    return check


def tools_sent(name: str, value: Any) -> Check:
    def check(req: GenerationRequest, body: dict[str, Any], guard: RecordingGuard) -> None:
        assert req.tools is not None and getattr(req.tools, name) == value

    return check


def ok(req: GenerationRequest, body: dict[str, Any], guard: RecordingGuard) -> None:
    """Accepted and answered; the field changes nothing this server could do otherwise
    (documented in the README: `modalities: ["text"]`, `store: false`, cache keys, tiers)."""


def answered(expect: Callable[[dict[str, Any]], bool]) -> Check:
    def check(req: GenerationRequest, body: dict[str, Any], guard: RecordingGuard) -> None:
        assert expect(body), body

    return check


def first_message(role: str, content: str) -> Check:
    def check(req: GenerationRequest, body: dict[str, Any], guard: RecordingGuard) -> None:
        assert isinstance(req.prompt, ChatPrompt)
        assert req.prompt.messages[0] == {"role": role, "content": content}

    return check


# field -> (extra request fields, check) for served fields; None for refused ones.
CHAT: dict[str, tuple[dict[str, Any], Check] | None] = {
    "messages": ({}, first_message("user", "Hi")),
    "model": ({}, answered(lambda b: b["model"] == MODEL)),
    "audio": None,
    "frequency_penalty": ({"frequency_penalty": 0.5}, sampling("frequency_penalty", 0.5)),
    "function_call": None,
    "functions": None,
    "logit_bias": ({"logit_bias": {"42": 3.0}}, sampling("logit_bias", {42: 3.0})),
    "logprobs": ({"logprobs": True}, sampling("logprobs", 0)),
    "max_completion_tokens": ({"max_completion_tokens": 3}, sampling("max_tokens", 3)),
    "max_tokens": ({"max_tokens": 4}, sampling("max_tokens", 4)),
    "metadata": None,
    "modalities": ({"modalities": ["text"]}, ok),
    "moderation": None,
    "n": ({"n": 2}, sampling("n", 2)),
    "parallel_tool_calls": (
        {"parallel_tool_calls": False, "tools": [TOOL]},
        tools_sent("parallel_tool_calls", False),
    ),
    "prediction": None,
    "presence_penalty": ({"presence_penalty": -0.5}, sampling("presence_penalty", -0.5)),
    "prompt_cache_key": ({"prompt_cache_key": "k"}, ok),
    "prompt_cache_options": None,
    "prompt_cache_retention": None,
    "reasoning_effort": ({"reasoning_effort": "low"}, kwarg("reasoning_effort", "low")),
    "response_format": (
        {"response_format": {"type": "json_object"}},
        sampling("structured", {"json_object": True}),
    ),
    "safety_identifier": ({"safety_identifier": "u-1"}, end_user("u-1")),
    "seed": ({"seed": 11}, sampling("seed", 11)),
    "service_tier": ({"service_tier": "auto"}, ok),
    "stop": ({"stop": ["x", "y"]}, sampling("stop", ("x", "y"))),
    "store": ({"store": False}, ok),
    "stream": ({"stream": True}, answered(lambda b: b["stream"])),
    "stream_options": (
        {"stream": True, "stream_options": {"include_usage": True}},
        answered(lambda b: b["chunks"][-1]["usage"] is not None),
    ),
    "temperature": ({"temperature": 0.3}, sampling("temperature", 0.3)),
    "tool_choice": (
        {"tool_choice": "required", "tools": [TOOL]},
        tools_sent("tool_choice", "required"),
    ),
    "tools": ({"tools": [TOOL]}, tools_sent("tool_choice", "auto")),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 3}, sampling("logprobs", 3)),
    "top_p": ({"top_p": 0.5}, sampling("top_p", 0.5)),
    "user": ({"user": "someone"}, end_user("someone")),
    "verbosity": None,
    "web_search_options": None,
}

COMPLETIONS: dict[str, tuple[dict[str, Any], Check] | None] = {
    "model": ({}, answered(lambda b: b["model"] == MODEL)),
    "prompt": ({}, answered(lambda b: b["choices"][0]["text"] == "ok")),
    "best_of": ({"best_of": 1}, ok),
    "echo": ({"echo": True}, answered(lambda b: b["choices"][0]["text"].startswith("Once"))),
    "frequency_penalty": ({"frequency_penalty": 1.0}, sampling("frequency_penalty", 1.0)),
    "logit_bias": ({"logit_bias": {"7": -1.0}}, sampling("logit_bias", {7: -1.0})),
    "logprobs": ({"logprobs": 2}, sampling("logprobs", 2)),
    "max_tokens": ({"max_tokens": 5}, sampling("max_tokens", 5)),
    "n": ({"n": 3}, sampling("n", 3)),
    "presence_penalty": ({"presence_penalty": 1.0}, sampling("presence_penalty", 1.0)),
    "seed": ({"seed": 5}, sampling("seed", 5)),
    "stop": ({"stop": "END"}, sampling("stop", ("END",))),
    "stream": ({"stream": True}, answered(lambda b: b["stream"])),
    "stream_options": (
        {"stream": True, "stream_options": {"include_usage": True}},
        answered(lambda b: b["chunks"][-1]["usage"] is not None),
    ),
    "suffix": None,
    "temperature": ({"temperature": 0.0}, sampling("temperature", 0.0)),
    "top_p": ({"top_p": 0.9}, sampling("top_p", 0.9)),
    "user": ({"user": "u2"}, end_user("u2")),
}

RESPONSES: dict[str, tuple[dict[str, Any], Check] | None] = {
    "access_programs": None,
    "background": None,
    "background_options": None,
    "context_management": None,
    "conversation": None,
    "image": None,
    "include": (
        {"include": ["message.output_text.logprobs"], "top_logprobs": 2},
        sampling("logprobs", 2),
    ),
    "input": ({}, first_message("user", "Hi")),
    "instructions": ({"instructions": "Be brief."}, first_message("system", "Be brief.")),
    "max_output_tokens": ({"max_output_tokens": 6}, sampling("max_tokens", 6)),
    "max_tool_calls": None,
    "metadata": ({"metadata": {"k": "v"}}, answered(lambda b: b["metadata"] == {"k": "v"})),
    "model": ({}, answered(lambda b: b["model"] == MODEL)),
    "moderation": None,
    "parallel_tool_calls": (
        {"parallel_tool_calls": False, "tools": [RTOOL]},
        tools_sent("parallel_tool_calls", False),
    ),
    "previous_response_id": None,
    "prompt": None,
    "prompt_cache_key": ({"prompt_cache_key": "k"}, ok),
    "prompt_cache_options": None,
    "prompt_cache_retention": None,
    "reasoning": ({"reasoning": {"effort": "high"}}, kwarg("reasoning_effort", "high")),
    "safety_identifier": ({"safety_identifier": "s"}, end_user("s")),
    "service_tier": ({"service_tier": "default"}, ok),
    "store": ({"store": False}, answered(lambda b: b["store"] is False)),
    "stream": ({"stream": True}, answered(lambda b: b["stream"])),
    "stream_options": (
        {"stream": True, "stream_options": {"include_obfuscation": False}},
        answered(lambda b: b["stream"]),
    ),
    "temperature": ({"temperature": 0.7}, sampling("temperature", 0.7)),
    "text": (
        {"text": {"format": {"type": "json_object"}}},
        sampling("structured", {"json_object": True}),
    ),
    "tool_choice": (
        {"tool_choice": {"type": "function", "name": "get_weather"}, "tools": [RTOOL]},
        tools_sent("tool_choice", {"type": "function", "function": {"name": "get_weather"}}),
    ),
    "tools": ({"tools": [RTOOL]}, tools_sent("tool_choice", "auto")),
    "top_logprobs": (
        {"top_logprobs": 1, "include": ["message.output_text.logprobs"]},
        sampling("logprobs", 1),
    ),
    "top_p": ({"top_p": 0.8}, sampling("top_p", 0.8)),
    "truncation": ({"truncation": "disabled"}, ok),
    "user": ({"user": "r"}, end_user("r")),
}

# A value for each refused field (any value is refused; these are plausible ones).
REFUSED_VALUES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "mp3"},
    "function_call": "auto",
    "functions": [{"name": "f"}],
    "metadata": {"k": "v"},
    "moderation": {"input": {"model": "omni-moderation-latest"}},
    "prediction": {"type": "content", "content": "x"},
    "prompt_cache_options": {"ttl": "24h"},
    "prompt_cache_retention": "24h",
    "verbosity": "low",
    "web_search_options": {},
    "suffix": "tail",
    "access_programs": {},
    "background": True,
    "background_options": {},
    "context_management": [],
    "conversation": "conv_1",
    "image": {},
    "max_tool_calls": 2,
    "previous_response_id": "resp_1",
    "prompt": {"id": "pmpt_1"},
}


def sdk_fields(module: Any, name: str) -> set[str]:
    return set(typing.get_type_hints(getattr(module, name))) | {"stream"}


def test_the_tables_cover_every_sdk_field() -> None:
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat
    from openai.types.responses import response_create_params as responses

    assert sdk_fields(chat, "CompletionCreateParamsBase") == set(CHAT)
    assert sdk_fields(completions, "CompletionCreateParamsBase") == set(COMPLETIONS)
    assert sdk_fields(responses, "ResponseCreateParamsBase") == set(RESPONSES)


def _post(client, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = client.post(path, json=body)
    if response.status_code != 200:
        return response.status_code, response.json()
    if body.get("stream"):
        chunks = [
            json.loads(line[6:])
            for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
        return 200, {"stream": True, "chunks": chunks}
    return 200, response.json()


CASES = [
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        CHAT,
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 4}, COMPLETIONS),
    ("/v1/responses", {"model": MODEL, "input": "Hi"}, RESPONSES),
]


@pytest.mark.parametrize(
    ("path", "base", "name"),
    [(path, base, name) for path, base, table in CASES for name in table],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else None,
)
def test_each_field_is_served_or_refused_by_name(
    client, fake_engine: FakeEngine, guard: RecordingGuard, path, base, name
) -> None:
    table = dict(next(t for p, _, t in CASES if p == path))
    case = table[name]
    if case is None:
        status, body = _post(client, path, {**base, name: REFUSED_VALUES[name]})
        assert status == 400, body
        assert body["error"]["param"] == name, body
        return
    extra, check = case
    before = len(fake_engine.history)
    status, body = _post(client, path, {**base, **extra})
    assert status == 200, body
    assert len(fake_engine.history) == before + 1
    check(sent(fake_engine), body, guard)


@pytest.mark.parametrize(
    ("path", "patch", "param"),
    [
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities.1"),
        ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "custom", "custom": {"name": "x"}}]},
            "tools.0.type",
        ),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        (
            "/v1/completions",
            {"stream": True, "stream_options": {"continuous_usage_stats": True}},
            "stream_options.continuous_usage_stats",
        ),
        ("/v1/responses", {"store": True}, "store"),
        ("/v1/responses", {"truncation": "auto"}, "truncation"),
        ("/v1/responses", {"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ("/v1/responses", {"include": ["reasoning.encrypted_content"]}, "include.0"),
        (
            "/v1/responses",
            {"text": {"format": {"type": "text"}, "verbosity": "low"}},
            "text.verbosity",
        ),
    ],
)
def test_unservable_values_are_refused_by_name(client, path, patch, param) -> None:
    base = next(b for p, b, _ in CASES if p == path)
    status, body = _post(client, path, {**base, **patch})
    assert status == 400, body
    assert body["error"]["param"] == param, body


@pytest.mark.parametrize(
    ("part", "where"),
    [
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "messages.0.content"),
        (
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            "messages.0.content",
        ),
        ({"type": "file", "file": {"file_id": "f"}}, "messages.0.content"),
        ({"type": "prompt_embeds", "data": "AAAA"}, "messages.0.content"),
    ],
)
def test_non_text_content_parts_are_refused_by_name(client, part, where) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": [part]}]}
    status, error = _post(client, "/v1/chat/completions", body)
    assert status == 400 and error["error"]["param"] == where, error
    assert part["type"] in error["error"]["message"]


def test_responses_non_text_input_is_refused(client) -> None:
    item = {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}
    status, error = _post(client, "/v1/responses", {"model": MODEL, "input": [item]})
    assert status == 400 and error["error"]["param"] == "input", error
    assert "input_image" in error["error"]["message"]


def _vllm_fields(path: str) -> set[str]:
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VCompletion
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VResponses

    model = {"/v1/chat/completions": VChat, "/v1/completions": VCompletion}.get(path, VResponses)
    return set(model.model_fields)


OURS = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
}


@pytest.mark.parametrize("path", list(OURS))
def test_every_vllm_extra_is_declared_or_refused_by_name(client, path) -> None:
    """vLLM's own request fields: ours (served, covered above or in the extras test) or a 400."""
    base = next(b for p, b, _ in CASES if p == path)
    declared = {f.alias or name for name, f in OURS[path].model_fields.items()}
    refused = sorted(_vllm_fields(path) - declared)
    assert refused, "vLLM has extras this server does not serve; each must be refused"
    for name in refused:
        status, body = _post(client, path, {**base, name: 1})
        assert status == 400 and body["error"]["param"] == name, (name, body)
        assert "Unsupported parameter" in body["error"]["message"]


EXTRAS: list[tuple[str, dict[str, Any], str, Any]] = [
    ("/v1/chat/completions", {"top_k": 5}, "top_k", 5),
    ("/v1/chat/completions", {"min_p": 0.1}, "min_p", 0.1),
    ("/v1/chat/completions", {"repetition_penalty": 1.2}, "repetition_penalty", 1.2),
    ("/v1/chat/completions", {"min_tokens": 2}, "min_tokens", 2),
    ("/v1/chat/completions", {"stop_token_ids": [9]}, "stop_token_ids", (9,)),
    ("/v1/chat/completions", {"ignore_eos": True}, "ignore_eos", True),
    (
        "/v1/chat/completions",
        {"include_stop_str_in_output": True},
        "include_stop_str_in_output",
        True,
    ),
    ("/v1/chat/completions", {"skip_special_tokens": False}, "skip_special_tokens", False),
    (
        "/v1/chat/completions",
        {"spaces_between_special_tokens": False},
        "spaces_between_special_tokens",
        False,
    ),
    ("/v1/chat/completions", {"bad_words": ["no"]}, "bad_words", ("no",)),
    ("/v1/chat/completions", {"allowed_token_ids": [1, 2]}, "allowed_token_ids", (1, 2)),
    ("/v1/chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs", 1),
    (
        "/v1/chat/completions",
        {"structured_outputs": {"regex": "a+"}},
        "structured",
        {"regex": "a+"},
    ),
    (
        "/v1/completions",
        {"structured_outputs": {"choice": ["a", "b"]}},
        "structured",
        {"choice": ["a", "b"]},
    ),
    (
        "/v1/completions",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "object"}},
            }
        },
        "structured",
        {"json": {"type": "object"}},
    ),
    ("/v1/completions", {"prompt_logprobs": 0}, "prompt_logprobs", 0),
    ("/v1/responses", {"top_k": 3}, "top_k", 3),
    (
        "/v1/responses",
        {"structured_outputs": {"json": {"type": "object"}}},
        "structured",
        {"json": {"type": "object"}},
    ),
]


@pytest.mark.parametrize(("path", "patch", "name", "value"), EXTRAS)
def test_vllm_extras_reach_the_engine(client, fake_engine, guard, path, patch, name, value) -> None:
    base = next(b for p, b, _ in CASES if p == path)
    status, body = _post(client, path, {**base, **patch})
    assert status == 200, body
    assert getattr(sent(fake_engine).sampling, name) == value


@pytest.mark.parametrize(
    ("patch", "key", "value"),
    [
        ({"add_generation_prompt": False}, "add_generation_prompt", False),
        (
            {"add_generation_prompt": False, "continue_final_message": True},
            "continue_final_message",
            True,
        ),
        ({"chat_template_kwargs": {"custom": 1}}, "custom", 1),
        ({"documents": [{"title": "t", "text": "x"}]}, "documents", [{"title": "t", "text": "x"}]),
        ({"reasoning_effort": "none"}, "enable_thinking", False),
    ],
)
def test_template_extras_reach_the_template(client, fake_engine, guard, patch, key, value) -> None:
    base = next(b for p, b, _ in CASES if p == "/v1/chat/completions")
    status, body = _post(client, "/v1/chat/completions", {**base, **patch})
    assert status == 200, body
    prompt = sent(fake_engine).prompt
    assert isinstance(prompt, ChatPrompt) and prompt.template_kwargs[key] == value


@pytest.mark.parametrize(
    "item",
    [
        {"role": "user", "content": "Hi", "name": "Harry Potter"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "extra": "x"},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi", "note": "Rowling"}]},
    ],
)
def test_responses_fields_not_read_are_refused_by_name(client, item) -> None:
    """A field the server would not read is refused, never dropped unseen."""
    status, error = _post(client, "/v1/responses", {"model": MODEL, "input": [item]})
    assert status == 400 and error["error"]["param"] == "input", error
    assert "unknown fields" in error["error"]["message"]
