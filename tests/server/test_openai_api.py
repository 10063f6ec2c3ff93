"""The OpenAI surface on the fake engine: shapes, parameters, streaming, errors."""

from __future__ import annotations

import json
import re

import pytest

from server.engine.fake import FakeEngine
from server.errors import EngineError
from tests.conftest import ADMIN_TOKEN

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def assert_envelope(response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type
    assert body["error"]["message"]
    return body["error"]


def test_chat_completion_shape(client, fake_engine: FakeEngine):
    fake_engine.enqueue("hello there")
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello there"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 2
    assert response.headers["x-request-id"]


def test_sampling_parameters_reach_the_engine(client, fake_engine: FakeEngine):
    request = {
        **CHAT,
        "max_completion_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "stop": "END",
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
    }
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200
    sent = fake_engine.history[-1].sampling
    assert (sent.max_tokens, sent.temperature, sent.top_p, sent.seed) == (7, 0.5, 0.9, 3)
    assert sent.stop == ("END",) and sent.n == 2 and sent.logprobs == 2
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] == -0.5


def test_max_tokens_truncates_with_length(client, fake_engine: FakeEngine):
    fake_engine.enqueue("one two three four")
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "one two"
    assert choice["finish_reason"] == "length"


def test_chat_stream_with_usage(client, fake_engine: FakeEngine):
    fake_engine.enqueue("a b c")
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == "a b c"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_completion_batch_and_stream(client, fake_engine: FakeEngine):
    fake_engine.enqueue("x y", "z")
    body = {"model": "fake-model", "prompt": ["p1", "p2"], "max_tokens": 5}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    texts = [c["text"] for c in response.json()["choices"]]
    assert texts == ["x y", "z"]
    fake_engine.enqueue("s t")
    stream = client.post("/v1/completions", json={**body, "prompt": "p", "stream": True})
    events = sse_events(stream.text)
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "s t"


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-model"]


def test_unknown_model_is_404(client):
    error = assert_envelope(
        client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404, "not_found_error"
    )
    assert error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"top_p": 0}, "top_p"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_invalid_values_are_400(client, patch, param):
    error = assert_envelope(
        client.post("/v1/chat/completions", json={**CHAT, **patch}), 400, "invalid_request_error"
    )
    assert error["param"] == param


def test_client_prompt_embeds_are_refused(client):
    part = {"type": "prompt_embeds", "data": "AAAA"}
    request = {**CHAT, "messages": [{"role": "user", "content": [part]}]}
    error = assert_envelope(
        client.post("/v1/chat/completions", json=request), 400, "invalid_request_error"
    )
    assert "prompt_embeds" in error["message"]


def test_malformed_json_is_400(client):
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400, "invalid_request_error")


def test_unknown_fields_are_refused_by_name(client):
    """Nothing is silently dropped: a field nothing serves is a 400 naming it."""
    error = assert_envelope(
        client.post("/v1/chat/completions", json={**CHAT, "frobnicate": 1}),
        400,
        "invalid_request_error",
    )
    assert error["param"] == "frobnicate" and "Unsupported parameter" in error["message"]


def test_context_length_is_400_naming_the_limit(client):
    long = {**CHAT, "messages": [{"role": "user", "content": "x" * 400}]}
    error = assert_envelope(
        client.post("/v1/chat/completions", json=long), 400, "invalid_request_error"
    )
    assert "256" in error["message"] and error["code"] == "context_length_exceeded"


def test_stream_errors_before_first_token_are_http_errors(client):
    long = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "x" * 400}]}
    assert_envelope(client.post("/v1/chat/completions", json=long), 400, "invalid_request_error")


def test_engine_failure_mid_stream_is_an_error_event(client, fake_engine: FakeEngine):
    fake_engine.enqueue(EngineError("boom"))
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["type"] == "upstream_error"


def test_engine_failure_without_stream_is_502(client, fake_engine: FakeEngine):
    fake_engine.enqueue(EngineError("boom"))
    assert_envelope(client.post("/v1/chat/completions", json=CHAT), 502, "upstream_error")


def test_unknown_route_and_method_use_the_envelope(client):
    assert_envelope(client.get("/v1/nothing"), 404, "not_found_error")
    assert_envelope(client.get("/v1/chat/completions"), 405, "invalid_request_error")


def test_health_ready_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    client.post("/v1/chat/completions", json=CHAT)
    text = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
    assert 'obliviate_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "obliviate_request_seconds_bucket" in text
    assert 'obliviate_tokens_total{kind="completion"}' in text
    assert "obliviate_requests_in_flight" in text


def _admissions(client) -> float:
    text = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
    found = re.search(r"^obliviate_admission_seconds_count (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_every_prompt_is_timed_from_arrival_to_the_engine(client):
    """obliviate_admission_seconds: one observation per prompt sent to the engine (a chat
    request, each prompt of a batched completion, streamed or not); none for a refused one."""
    before = _admissions(client)
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    body = {"model": "fake-model", "prompt": ["p1", "p2", "p3"], "max_tokens": 4}
    client.post("/v1/completions", json=body)
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1})  # 400
    assert _admissions(client) - before == 5


def test_batched_completion_stream_error_closes_every_prompt(client, fake_engine: FakeEngine):
    fake_engine.enqueue("a b c d", EngineError("boom"))
    body = {"model": "fake-model", "prompt": ["p1", "p2"], "max_tokens": 8, "stream": True}
    events = sse_events(client.post("/v1/completions", json=body).text)
    assert events[-1] == "[DONE]"
    assert any('"upstream_error"' in e for e in events)
    assert fake_engine.running == 0
