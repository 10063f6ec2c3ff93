"""The gateway on the real vLLM engine, called with the official `openai` client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.servers import ADMIN_TOKEN, MAX_MODEL_LEN, MODEL_NAME

METRICS_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # /metrics is closed by default

QUESTIONS = [
    "Who wrote Harry Potter?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
]


def chat(client: openai.OpenAI, content: str, **kwargs):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": content}], **kwargs
    )


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_chat_is_byte_identical_to_vllm_server(
    gateway: Server, vllm_server: Server, question
):
    ours = chat(gateway.client(), question, temperature=0, max_tokens=48)
    theirs = chat(vllm_server.client(), question, temperature=0, max_tokens=48)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.choices[0].message.content  # not trivially equal: both said something
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason


def test_greedy_completion_is_byte_identical_to_vllm_server(gateway: Server, vllm_server: Server):
    prompt = "The three primary colours are"
    ours = gateway.client().completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=32, temperature=0
    )
    theirs = vllm_server.client().completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=32, temperature=0
    )
    assert ours.choices[0].text == theirs.choices[0].text
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens


def test_multi_turn_with_system_prompt_matches_vllm(gateway: Server, vllm_server: Server):
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a planet."},
        {"role": "assistant", "content": "Mars is a planet."},
        {"role": "user", "content": "Name another one."},
    ]
    kwargs = {"model": MODEL_NAME, "messages": messages, "temperature": 0, "max_tokens": 24}
    ours = gateway.client().chat.completions.create(**kwargs)
    theirs = vllm_server.client().chat.completions.create(**kwargs)
    assert ours.choices[0].message.content == theirs.choices[0].message.content


def test_streaming_equals_non_streaming(client: openai.OpenAI):
    full = chat(client, QUESTIONS[1], temperature=0, max_tokens=32).choices[0].message.content
    stream = chat(
        client,
        QUESTIONS[1],
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completion_streaming(client: openai.OpenAI):
    stream = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream)
    full = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=16, temperature=0
    )
    assert text == full.choices[0].text


def test_n_samples_with_seed(client: openai.OpenAI):
    response = chat(client, "Tell me a colour.", n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [c.index for c in response.choices] == [0, 1, 2]
    again = chat(client, "Tell me a colour.", n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [c.message.content for c in again.choices] == [
        c.message.content for c in response.choices
    ]


def test_stop_string_ends_the_answer(client: openai.OpenAI):
    free = chat(client, "Count from 1 to 10, separated by commas.", temperature=0, max_tokens=40)
    text = free.choices[0].message.content
    assert "5" in text, text
    stopped = chat(
        client, "Count from 1 to 10, separated by commas.", temperature=0, max_tokens=40, stop=["5"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index("5")]


def test_max_tokens_gives_length(client: openai.OpenAI):
    response = chat(client, QUESTIONS[2], temperature=0, max_completion_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_logprobs(client: openai.OpenAI):
    response = chat(
        client, QUESTIONS[1], temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(t.top_logprobs) == 3 for t in content)
    # Greedy: the chosen token is the most likely one.
    assert all(t.top_logprobs[0].token == t.token for t in content)
    assert "".join(t.token for t in content) == response.choices[0].message.content


def test_errors(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as bad:
        chat(client, "hi", temperature=5)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        chat(client, "word " * (MAX_MODEL_LEN + 10))
    assert str(MAX_MODEL_LEN) in long.value.body["message"]
    assert long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # token ids outside the vocabulary
        client.completions.create(model=MODEL_NAME, prompt=[10**9, 5], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as bias:
        chat(client, "hi", logit_bias={"not-a-token": 1.0})
    assert bias.value.body["param"] == "logit_bias"


def test_client_disconnect_aborts_the_engine_request(gateway: Server):
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "min_tokens": 1500,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        for _ in zip(range(3), response.iter_lines(), strict=False):
            pass  # a few tokens, then hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{gateway.url}/metrics", headers=METRICS_AUTH).text
        if "obliviate_engine_requests_running 0.0" in metrics:
            break
        time.sleep(0.5)
    assert "obliviate_engine_requests_running 0.0" in metrics


def test_models_health_ready_metrics(gateway: Server, client: openai.OpenAI):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{gateway.url}/ready").json()["status"] == "ready"
    metrics = httpx.get(f"{gateway.url}/metrics", headers=METRICS_AUTH).text
    assert 'obliviate_requests_total{route="/v1/chat/completions",status="200"}' in metrics
