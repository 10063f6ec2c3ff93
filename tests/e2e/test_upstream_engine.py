"""`openai_upstream`: the gateway in front of vLLM's own api_server, started by the test."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.servers import MODEL_NAME


def test_chat_through_upstream_matches_vllm(upstream_gateway: Server, vllm_server: Server):
    kwargs = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "What is the capital of Italy?"}],
        "temperature": 0,
        "max_tokens": 32,
    }
    ours = upstream_gateway.client().chat.completions.create(**kwargs)
    theirs = vllm_server.client().chat.completions.create(**kwargs)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens


def test_streaming_and_completions_through_upstream(upstream_gateway: Server, vllm_server: Server):
    client = upstream_gateway.client()
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=16,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    direct = vllm_server.client().chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Say hello."}],
        temperature=0,
        max_tokens=16,
    )
    assert streamed == direct.choices[0].message.content
    ours = client.completions.create(
        model=MODEL_NAME, prompt="1, 2, 3,", max_tokens=8, temperature=0
    )
    theirs = vllm_server.client().completions.create(
        model=MODEL_NAME, prompt="1, 2, 3,", max_tokens=8, temperature=0
    )
    assert ours.choices[0].text == theirs.choices[0].text


def test_upstream_errors_keep_the_envelope(upstream_gateway: Server):
    client = upstream_gateway.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4
        )
    assert err.value.body["type"] == "invalid_request_error"


def test_tools_structured_outputs_and_responses_pass_through(
    upstream_gateway: Server, vllm_server: Server
):
    """In front of an upstream, tools, tool choices, structured outputs and the Responses API
    reach it as vLLM reads them (unflagged requests), with the same answers."""
    from tests.e2e.test_openai_on_vllm import ASK_WEATHER, TIME, WEATHER, YES_NO, assert_same_answer

    kwargs = {"model": MODEL_NAME, "messages": ASK_WEATHER, "temperature": 0, "max_tokens": 40}
    shapes = [
        {"tools": [WEATHER, TIME], "tool_choice": "required"},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "y", "schema": YES_NO},
            }
        },
    ]
    for shape in shapes:
        ours = upstream_gateway.client().chat.completions.create(**kwargs, **shape)
        theirs = vllm_server.client().chat.completions.create(**kwargs, **shape)
        assert_same_answer(ours, theirs)
    assert ours.choices[0].message.content
    args = {
        "model": MODEL_NAME,
        "input": "Name a colour.",
        "temperature": 0,
        "max_output_tokens": 16,
    }
    ours_r = upstream_gateway.client().responses.create(**args)
    assert ours_r.output_text == vllm_server.client().responses.create(**args).output_text
    tokens = {"model": MODEL_NAME, "messages": ASK_WEATHER, "tools": [WEATHER]}
    assert (
        httpx.post(f"{upstream_gateway.url}/tokenize", json=tokens).json()
        == httpx.post(f"{vllm_server.url}/tokenize", json=tokens).json()
    )
