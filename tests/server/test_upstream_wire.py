"""What the upstream engine sends and reads for the wider surface (httpx MockTransport):
tools, template fields and structured outputs go upstream as vLLM reads them; a non-streaming
request with tools is asked as a whole answer (vLLM parses those differently from a stream)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from server.engine import ChatPrompt, GenerationRequest, SamplingOptions, ToolOptions
from server.engine.openai_upstream import OpenAIUpstreamEngine, UpstreamConfig

TOOL = {"type": "function", "function": {"name": "f", "description": None, "parameters": None}}


def engine(answer: dict[str, Any], seen: list[dict[str, Any]]) -> OpenAIUpstreamEngine:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 64}]})
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=answer)

    return OpenAIUpstreamEngine(
        UpstreamConfig("http://upstream/v1"), transport=httpx.MockTransport(handle)
    )


async def collect(upstream: OpenAIUpstreamEngine, request: GenerationRequest) -> list[Any]:
    await upstream.start()
    await upstream.wait_ready()
    try:
        return [chunk async for chunk in upstream.generate(request)]
    finally:
        await upstream.stop()


@pytest.mark.asyncio
async def test_whole_answer_with_tools_is_asked_whole() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
    ]
    answer = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5},
    }
    seen: list[dict[str, Any]] = []
    prompt = ChatPrompt(
        [{"role": "developer", "content": "a\nb", "parts": ["a", "b"]}],
        tools=[TOOL],
        template_kwargs={
            "add_generation_prompt": True,
            "continue_final_message": False,
            "reasoning_effort": "low",
            "custom": 1,
        },
    )
    request = GenerationRequest(
        "r",
        prompt,
        SamplingOptions(structured={"json_object": True}, stop_token_ids=(5,)),
        stream=False,
        tools=ToolOptions([TOOL], "required", False),
    )
    (chunk,) = await collect(engine(answer, seen), request)
    body = seen[0]
    assert "stream" not in body
    assert body["messages"] == [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        }
    ]
    assert body["tools"] == [TOOL] and body["tool_choice"] == "required"
    assert body["parallel_tool_calls"] is False
    assert body["reasoning_effort"] == "low" and body["chat_template_kwargs"] == {"custom": 1}
    assert body["structured_outputs"] == {"json_object": True} and body["stop_token_ids"] == [5]
    (choice,) = chunk.choices
    assert choice.null_content and choice.finish_reason == "tool_calls"
    assert [(c.index, c.id, c.arguments) for c in choice.tool_calls] == [
        (0, "a", "{}"),
        (1, "b", '{"x": 1}'),
    ]
    assert (chunk.prompt_tokens, chunk.completion_tokens) == (7, 5)


@pytest.mark.asyncio
async def test_prompt_logprobs_are_refused_in_front_of_an_upstream() -> None:
    from server.errors import InvalidRequestError

    request = GenerationRequest(
        "r", ChatPrompt([{"role": "user", "content": "x"}]), SamplingOptions(prompt_logprobs=0)
    )
    with pytest.raises(InvalidRequestError) as refused:
        await collect(engine({}, []), request)
    assert refused.value.param == "prompt_logprobs"
