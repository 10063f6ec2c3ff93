"""The gateway on the real vLLM engine, called with the official `openai` client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.servers import ADMIN_TOKEN, MAX_MODEL_LEN, MODEL_NAME, raw_chat_post

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


LONG_STORY = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 1500,
    "min_tokens": 1500,
}


def _until_engine_running(gateway: Server, count: int, failure: str) -> None:
    """Wait (20 s at most) until the engine runs `count` requests."""
    deadline = time.monotonic() + 20
    gauge = f"obliviate_engine_requests_running {count:.1f}"
    while gauge not in httpx.get(f"{gateway.url}/metrics", headers=METRICS_AUTH).text:
        assert time.monotonic() < deadline, failure
        time.sleep(0.2)


def test_client_disconnect_aborts_the_engine_request(gateway: Server):
    body = {**LONG_STORY, "stream": True}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        for _ in zip(range(3), response.iter_lines(), strict=False):
            pass  # a few tokens, then hang up
    _until_engine_running(gateway, 0, "the engine request went on after the hang-up")


def test_client_disconnect_aborts_a_request_that_is_not_streamed(gateway: Server):
    # The route awaits the whole answer; a watcher cancels it when the client hangs up
    # (server.routes.cancel), which closes the engine request.
    with raw_chat_post(gateway.url, json.dumps(LONG_STORY).encode()):
        _until_engine_running(gateway, 1, "the request never reached the engine")
    # Hung up while the engine writes the answer.
    _until_engine_running(gateway, 0, "the engine request went on after the hang-up")


def test_models_health_ready_metrics(gateway: Server, client: openai.OpenAI):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{gateway.url}/ready").json()["status"] == "ready"
    metrics = httpx.get(f"{gateway.url}/metrics", headers=METRICS_AUTH).text
    assert 'obliviate_requests_total{route="/v1/chat/completions",status="200"}' in metrics


# --- The wider OpenAI surface, side by side with vLLM's own server (same model, same flags:
# `--enable-auto-tool-choice --tool-call-parser hermes` on both), greedy, OpenAI SDK client. ---

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
YES_NO = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def both(gateway: Server, vllm_server: Server, **kwargs):
    """The same chat request to the gateway and to vLLM's server."""
    kwargs = {"model": MODEL_NAME, "temperature": 0, **kwargs}
    return (
        gateway.client().chat.completions.create(**kwargs),
        vllm_server.client().chat.completions.create(**kwargs),
    )


def calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def assert_same_answer(ours, theirs) -> None:
    a, b = ours.choices[0], theirs.choices[0]
    assert a.message.content == b.message.content
    assert calls(a.message) == calls(b.message)
    assert a.finish_reason == b.finish_reason
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens


ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ("tools, tool_choice auto", {"tools": [WEATHER, TIME]}),
        ("tools, tool_choice none", {"tools": [WEATHER], "tool_choice": "none"}),
        ("tools, tool_choice required", {"tools": [WEATHER, TIME], "tool_choice": "required"}),
        (
            "tools, named tool_choice",
            {
                "tools": [WEATHER, TIME],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
        ),
        (
            "tools, required, parallel_tool_calls false",
            {"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False},
        ),
        (
            "tools auto, the model's own text parsed into a call",
            {"tools": [WEATHER], "extra_body": {"structured_outputs": {"choice": [HERMES_CALL]}}},
        ),
    ],
)
def test_tool_calls_match_vllm(gateway: Server, vllm_server: Server, shape, kwargs):
    # Prose answers are compared on a short budget; calls need room to finish.
    budget = 24 if shape.endswith(("auto", "none")) else 64
    ours, theirs = both(gateway, vllm_server, messages=ASK_WEATHER, max_tokens=budget, **kwargs)
    assert_same_answer(ours, theirs)
    if "required" in shape or "named" in shape or "parsed" in shape:
        assert calls(ours.choices[0].message), shape  # not trivially equal: a call was made
        name, arguments = calls(ours.choices[0].message)[0]
        assert name in ("get_weather", "get_time"), name
        json.loads(arguments)  # the arguments are JSON


def test_tool_result_turn_matches_vllm(gateway: Server, vllm_server: Server):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees."},
    ]
    ours, theirs = both(gateway, vllm_server, messages=messages, tools=[WEATHER], max_tokens=32)
    assert_same_answer(ours, theirs)
    assert ours.choices[0].message.content


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[str, list[tuple[str, str]], str | None]:
    stream = client.chat.completions.create(model=MODEL_NAME, temperature=0, stream=True, **kwargs)
    text, pieces, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for c in choice.delta.tool_calls or []:
                name, args = pieces.get(c.index, ("", ""))
                fn = c.function
                pieces[c.index] = (
                    name + ((fn.name or "") if fn else ""),
                    args + ((fn.arguments or "") if fn else ""),
                )
            finish = choice.finish_reason or finish
    return text, [pieces[i] for i in sorted(pieces)], finish


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_streamed_tool_call_deltas_match_vllm(gateway: Server, vllm_server: Server, choice):
    kwargs = {
        "messages": ASK_WEATHER,
        "tools": [WEATHER, TIME],
        "tool_choice": choice,
        "max_tokens": 48,
    }
    ours = _streamed(gateway.client(), **kwargs)
    assert ours == _streamed(vllm_server.client(), **kwargs)
    assert ours[1] and ours[1][0][0] in ("get_weather", "get_time")


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ("response_format json_object", {"response_format": {"type": "json_object"}}),
        (
            "response_format json_schema",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "yes_no", "schema": YES_NO},
                }
            },
        ),
        ("structured_outputs json", {"extra_body": {"structured_outputs": {"json": YES_NO}}}),
        (
            "structured_outputs regex",
            {"extra_body": {"structured_outputs": {"regex": "[A-Z][a-z]+"}}},
        ),
        (
            "structured_outputs choice",
            {"extra_body": {"structured_outputs": {"choice": ["Paris", "Rome"]}}},
        ),
    ],
)
def test_structured_outputs_match_vllm(gateway: Server, vllm_server: Server, shape, kwargs):
    messages = [{"role": "user", "content": "Is Paris the capital of France? Answer in JSON."}]
    ours, theirs = both(gateway, vllm_server, messages=messages, max_tokens=40, **kwargs)
    assert_same_answer(ours, theirs)
    content = ours.choices[0].message.content
    if "json" in shape and "schema" in shape or shape == "structured_outputs json":
        assert json.loads(content)["answer"] in ("yes", "no")
    elif "choice" in shape:
        assert content in ("Paris", "Rome")


@pytest.mark.parametrize(
    ("shape", "messages"),
    [
        (
            "text content parts",
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Name a colour."},
                        {"type": "text", "text": "One word."},
                    ],
                }
            ],
        ),
        (
            "developer and system turns",
            [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "Answer in English."},
                {"role": "user", "content": "Name a fruit."},
            ],
        ),
        ("named user", [{"role": "user", "name": "ann", "content": "Name a planet."}]),
    ],
)
def test_message_shapes_match_vllm(gateway: Server, vllm_server: Server, shape, messages):
    ours, theirs = both(gateway, vllm_server, messages=messages, max_tokens=24)
    assert_same_answer(ours, theirs)


def _response_text(client: openai.OpenAI, **kwargs):
    return client.responses.create(model=MODEL_NAME, temperature=0, **kwargs)


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ("text input", {"input": "What is the capital of France?", "max_output_tokens": 24}),
        (
            "message list with instructions, store false",
            {
                "instructions": "Answer in one short sentence.",
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "Name a planet."}]},
                    {"role": "assistant", "content": "Mars."},
                    {"role": "user", "content": "Another one?"},
                ],
                "store": False,
                "max_output_tokens": 24,
            },
        ),
        (
            "text format json_schema",
            {
                "input": "Is Rome in Italy? Answer in JSON.",
                "text": {"format": {"type": "json_schema", "name": "yes_no", "schema": YES_NO}},
                "max_output_tokens": 40,
            },
        ),
    ],
)
def test_responses_match_vllm(gateway: Server, vllm_server: Server, shape, kwargs):
    ours = _response_text(gateway.client(), **kwargs)
    theirs = _response_text(vllm_server.client(), **kwargs)
    assert ours.output_text and ours.output_text == theirs.output_text
    assert ours.status == theirs.status
    assert ours.usage.input_tokens == theirs.usage.input_tokens
    assert ours.usage.output_tokens == theirs.usage.output_tokens


def test_responses_stream_matches_vllm(gateway: Server, vllm_server: Server):
    def events(client: openai.OpenAI) -> tuple[list[str], str, str]:
        stream = client.responses.create(
            model=MODEL_NAME,
            input="Name three colours.",
            temperature=0,
            max_output_tokens=24,
            stream=True,
        )
        got = list(stream)
        kinds = [e.type for e in got if e.type != "response.output_text.delta"]
        deltas = "".join(e.delta for e in got if e.type == "response.output_text.delta")
        return kinds, deltas, got[-1].response.output_text

    ours = events(gateway.client())
    assert ours == events(vllm_server.client())
    assert ours[1] and ours[0][0] == "response.created" and ours[0][-1] == "response.completed"


def test_responses_function_call_matches_vllm(gateway: Server, vllm_server: Server):
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": WEATHER["function"]["parameters"],
    }
    kwargs = {
        "input": "Weather in Paris?",
        "tools": [tool],
        "tool_choice": "required",
        "max_output_tokens": 96,
    }
    ours = _response_text(gateway.client(), **kwargs)
    theirs = _response_text(vllm_server.client(), **kwargs)

    def fc(response):
        return [(o.name, o.arguments) for o in response.output if o.type == "function_call"]

    assert fc(ours) and fc(ours) == fc(theirs)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "The three primary colours are", "return_token_strs": True},
        {"messages": ASK_WEATHER, "tools": [WEATHER]},
        {
            "messages": [*ASK_WEATHER, {"role": "assistant", "content": "It is"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    ],
)
def test_tokenize_and_detokenize_match_vllm(gateway: Server, vllm_server: Server, body):
    ours = httpx.post(f"{gateway.url}/tokenize", json={"model": MODEL_NAME, **body}).json()
    theirs = httpx.post(f"{vllm_server.url}/tokenize", json={"model": MODEL_NAME, **body}).json()
    assert ours == theirs and ours["count"] >= 5
    detok = {"model": MODEL_NAME, "tokens": ours["tokens"]}
    assert (
        httpx.post(f"{gateway.url}/detokenize", json=detok).json()
        == httpx.post(f"{vllm_server.url}/detokenize", json=detok).json()
    )


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ("echo", {"echo": True, "max_tokens": 8}),
        ("echo with logprobs", {"echo": True, "logprobs": 2, "max_tokens": 8}),
        ("echo only the prompt", {"echo": True, "logprobs": 1, "max_tokens": 0}),
        ("prompt_logprobs", {"max_tokens": 4, "extra_body": {"prompt_logprobs": 1}}),
    ],
)
def test_completion_echo_and_prompt_logprobs_match_vllm(
    gateway: Server, vllm_server: Server, shape, kwargs
):
    args = {"model": MODEL_NAME, "prompt": "The capital of France is", "temperature": 0, **kwargs}
    ours = gateway.client().completions.create(**args).model_dump()
    theirs = vllm_server.client().completions.create(**args).model_dump()
    for key in ("text", "logprobs", "finish_reason", "prompt_logprobs"):
        assert ours["choices"][0].get(key) == theirs["choices"][0].get(key), key
    assert ours["usage"] == theirs["usage"]
    assert ours["choices"][0]["text"].startswith("The capital") == kwargs.get("echo", False)


def test_image_parts_are_refused_like_vllm(gateway: Server, vllm_server: Server):
    """Not a multimodal model: both refuse an image (the gateway names the field)."""
    part = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    for server in (gateway, vllm_server):
        with pytest.raises(openai.BadRequestError) as refused:
            server.client().chat.completions.create(model=MODEL_NAME, messages=messages)
        if server is gateway:
            assert refused.value.body["param"] == "messages.0.content"


def test_answer_logprobs_through_the_gateway_match_transformers(gateway: Server, model_path):
    """Teacher-forced scoring through the gateway itself (`obliviate eval --eco-scoring
    gateway`) gives the log-probabilities transformers computes on the same weights."""
    from transformers import AutoTokenizer

    from evaluation.gateway import Gateway
    from evaluation.scoring import AnswerScorer, GatewayScorer, ScoreItem, load_model
    from tests.e2e.servers import ADMIN_TOKEN

    items = [
        ScoreItem([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
        ScoreItem(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a sea."},
            ],
            "The Baltic Sea is a sea in northern Europe.",
        ),
    ]
    gw = Gateway(gateway.url, ADMIN_TOKEN, concurrency=2, model=MODEL_NAME)
    try:
        ours = GatewayScorer(gw).token_logprobs(items)
    finally:
        gw.close()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    theirs = AnswerScorer(tokenizer, [(load_model(model_path), 1.0)]).token_logprobs(items)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) == len(b) > 1
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3, (a, b)
