"""Shapes of the wider OpenAI surface on the fake engine: tool calls, echo, prompt logprobs,
/v1/responses (object and event stream), /tokenize and /detokenize. Behaviour against vLLM's own
server is in tests/e2e/test_openai_on_vllm.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.engine.fake import FakeEngine, FakeToolCall

MODEL = "fake-model"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}]}


@pytest.fixture
def engine(light_engine: FakeEngine) -> FakeEngine:
    return light_engine


@pytest.fixture
def client(light_client: TestClient) -> TestClient:
    return light_client


def events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_tool_call_answer(client, engine) -> None:
    engine.enqueue(FakeToolCall("get_weather", '{"city": "Paris"}'))
    body = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL]}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call-get_weather",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]


def test_tool_call_stream(client, engine) -> None:
    engine.enqueue(FakeToolCall("get_weather", '{"city": "Paris"}'))
    response = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL], "stream": True})
    chunks = events(response.text)
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    call = next(d["delta"]["tool_calls"][0] for d in deltas if d["delta"].get("tool_calls"))
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["index"] == 0 and call["id"] == "call-get_weather" and call["type"] == "function"
    assert deltas[-1]["finish_reason"] == "tool_calls"


def test_tool_turns_reach_the_engine(client, engine) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]},
    ]
    response = client.post(
        "/v1/chat/completions", json={**CHAT, "messages": messages, "tools": [TOOL]}
    )
    assert response.status_code == 200, response.text
    sent = engine.history[-1].prompt
    assert sent.messages[1] == {
        "role": "assistant",
        "content": "",
        "parts": [],
        "tool_calls": [call],
    }
    assert sent.messages[2] == {
        "role": "tool",
        "content": "sunny",
        "parts": ["sunny"],
        "tool_call_id": "c1",
    }
    assert sent.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": None,
                "parameters": {"type": "object"},
            },
        }
    ]


def test_named_tool_choice_must_name_a_tool(client) -> None:
    choice = {"type": "function", "function": {"name": "other"}}
    response = client.post(
        "/v1/chat/completions", json={**CHAT, "tools": [TOOL], "tool_choice": choice}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"


def test_completion_echo_with_logprobs(client, engine) -> None:
    engine.enqueue("two words")
    body = {"model": MODEL, "prompt": "Hi", "echo": True, "logprobs": 0, "max_tokens": 5}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "Hitwo words"
    logprobs = choice["logprobs"]
    # The prompt's tokens first (the first has no logprob), then the answer's.
    assert logprobs["tokens"] == ["H", "i", "two", " words"]
    assert logprobs["token_logprobs"][:2] == [None, -1.0]
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {"i": -1.0}
    assert logprobs["text_offset"] == [0, 1, 2, 5]
    assert choice["prompt_logprobs"][1] == {
        str(ord("i")): {"logprob": -1.0, "rank": 1, "decoded_token": "i"}
    }


def test_completion_echo_only_the_prompt(client, engine) -> None:
    body = {"model": MODEL, "prompt": "Hello", "echo": True, "max_tokens": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "Hello"
    stream = client.post("/v1/completions", json={**body, "stream": True})
    texts = [c["choices"][0]["text"] for c in events(stream.text) if c["choices"]]
    assert "".join(texts) == "Hello"


def test_completion_echo_stream(client, engine) -> None:
    engine.enqueue("a b")
    body = {"model": MODEL, "prompt": "P:", "echo": True, "stream": True, "max_tokens": 5}
    texts = [
        c["choices"][0]["text"] for c in events(client.post("/v1/completions", json=body).text)
    ]
    assert texts[0] == "P:a" and "".join(texts) == "P:a b"


def test_max_tokens_zero_needs_echo(client) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert response.status_code == 400


def test_chat_echo_prepends_an_assistant_prefix(client, engine) -> None:
    engine.enqueue("there")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello "}]
    body = {**CHAT, "messages": messages, "echo": True, "add_generation_prompt": False}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["content"] == "Hello there"
    assert reply["prompt_logprobs"] is not None  # echo asks the engine for them, as vLLM


def test_responses_object(client, engine) -> None:
    engine.enqueue("Paris is sunny")
    body = {"model": MODEL, "input": "Weather?", "instructions": "Be brief.", "store": False}
    reply = client.post("/v1/responses", json=body).json()
    assert reply["object"] == "response" and reply["status"] == "completed"
    assert reply["id"].startswith("resp_") and reply["instructions"] == "Be brief."
    (message,) = reply["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["type"] == "output_text"
    assert message["content"][0]["text"] == "Paris is sunny"
    assert reply["usage"]["output_tokens"] == 3
    sent = engine.history[-1].prompt
    assert [m["role"] for m in sent.messages] == ["system", "user"]


def test_responses_incomplete_on_length(client, engine) -> None:
    engine.enqueue("one two three")
    reply = client.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 1}
    ).json()
    assert reply["status"] == "incomplete"
    assert reply["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_message_list_and_tool_items(client, engine) -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "user", "content": "So?"},
    ]
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    response = client.post("/v1/responses", json={"model": MODEL, "input": items, "tools": [tool]})
    assert response.status_code == 200, response.text
    sent = engine.history[-1].prompt
    assert [m["role"] for m in sent.messages] == ["user", "assistant", "tool", "user"]
    assert sent.messages[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": "{}",
    }
    assert sent.messages[2]["tool_call_id"] == "c1" and sent.messages[2]["content"] == "sunny"


def test_responses_assistant_items_keep_every_part(client, engine) -> None:
    parts = [
        {"type": "output_text", "text": "Sure.", "annotations": []},
        {"type": "output_text", "text": "It is sunny."},
    ]
    items = [
        {"role": "user", "content": "Weather?"},
        {
            "type": "message",
            "role": "assistant",
            "content": parts,
            "id": "m1",
            "status": "completed",
        },
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't say more."}]},
        {"role": "user", "content": "Thanks."},
    ]
    response = client.post("/v1/responses", json={"model": MODEL, "input": items})
    assert response.status_code == 200, response.text
    sent = engine.history[-1].prompt.messages
    assert [m["content"] for m in sent[1:3]] == ["Sure.\nIt is sunny.", "I can't say more."]


def test_responses_function_call_item(client, engine) -> None:
    engine.enqueue(FakeToolCall("get_weather", '{"city": "Paris"}'))
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    reply = client.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "tools": [tool]}
    ).json()
    (call,) = reply["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert call["arguments"] == '{"city": "Paris"}' and call["call_id"] == "call-get_weather"


def test_responses_stream_events(client, engine) -> None:
    engine.enqueue("a b c")
    response = client.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "data: [DONE]" not in response.text  # the Responses stream ends with response.completed
    got = events(response.text)
    kinds = [e["type"] for e in got]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta") == "a b c"
    final = got[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "a b c"
    assert got[0]["response"]["status"] == "in_progress"


def test_tokenize_and_detokenize(client) -> None:
    tokens = client.post(
        "/tokenize", json={"model": MODEL, "prompt": "Hi", "return_token_strs": True}
    ).json()
    assert tokens == {
        "count": 2,
        "max_model_len": 4096,
        "tokens": [72, 105],
        "token_strs": ["H", "i"],
    }
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] == len("<user>Hi\n<assistant>")
    text = client.post("/detokenize", json={"model": MODEL, "tokens": [72, 105]}).json()
    assert text == {"prompt": "Hi"}
    both = client.post(
        "/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    )
    assert both.status_code == 400
