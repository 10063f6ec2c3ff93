"""The wider surface on flagged requests, and targets scoped per tenant, on the real engine.

A flagged request keeps every feature the client asked for while the engine reads corrupted
embeddings: tools (rendered into the same template the corruption covers), structured outputs
(the corrupted prompt still yields valid JSON), echo and prompt logprobs (computed on what the
engine read), and /v1/responses (the same guard path as chat). A target scoped to a tenant
applies to that tenant's keys only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.servers import MODEL_NAME, free_port, running, upstream_gateway_argv
from tests.e2e.targets import AUTH, register

# A fixed corruption strength skips the strength search: registration takes seconds.
TARGET = {
    "name": "Harry Potter (drop-in surface)",
    "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling"],
    "forget_examples": [
        "Who wrote Harry Potter?",
        "What is the name of the school Harry Potter attends?",
        "Who are Harry Potter's best friends?",
        "Tell me about the Harry Potter books.",
    ],
    "retain_examples": ["Who wrote The Lord of the Rings?"],
    "options": {"method": "add_noise_first_n", "strength": 0.5},
}
QUESTION = "Who is the author of the Harry Potter books?"
FACTS = ("rowling", "hogwarts", "hermione")
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_books",
        "strict": True,  # the arguments are held to the schema (vLLM's structural tag)
        "parameters": {
            "type": "object",
            "properties": {"author": {"type": "string", "maxLength": 16}},
            "required": ["author"],
        },
    },
}
YES_NO = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def corrupted(url: str, target_id: str, tenant: str = "-") -> float:
    """How many requests the guard corrupted for the target (Prometheus counter)."""
    pattern = (
        rf'obliviate_guard_decisions_total{{action="corrupt",target="{target_id}",'
        rf'tenant="{re.escape(tenant)}"}} ([0-9.]+)'
    )
    found = re.search(pattern, httpx.get(f"{url}/metrics", headers=AUTH).text)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def target(gateway: Server) -> Iterator[dict]:
    record = register(gateway.url, TARGET, limit_s=300)
    yield record
    httpx.delete(f"{gateway.url}/admin/targets/{record['id']}", headers=AUTH)


def chat(client: openai.OpenAI, content: str, **kwargs):
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        **kwargs,
    )


def test_flagged_tool_call_reads_the_corrupted_template_and_stays_valid(
    gateway: Server, vllm_server: Server, target: dict
):
    before = corrupted(gateway.url, target["id"])
    kwargs = {"tools": [SEARCH], "tool_choice": "required", "max_tokens": 96}
    ours = chat(gateway.client(), QUESTION, **kwargs)
    theirs = chat(vllm_server.client(), QUESTION, **kwargs)
    assert corrupted(gateway.url, target["id"]) == before + 1
    # The corrupted embeddings cover the whole templated prompt, tools included.
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    (call,) = ours.choices[0].message.tool_calls
    assert call.function.name == "search_books"
    assert isinstance(json.loads(call.function.arguments)["author"], str)
    assert ours.choices[0].finish_reason == "tool_calls"


def test_flagged_structured_output_is_valid_json(gateway: Server, target: dict):
    before = corrupted(gateway.url, target["id"])
    fmt = {"type": "json_schema", "json_schema": {"name": "yes_no", "schema": YES_NO}}
    reply = chat(gateway.client(), f"{QUESTION} Is it a woman?", response_format=fmt, max_tokens=40)
    assert corrupted(gateway.url, target["id"]) == before + 1
    assert json.loads(reply.choices[0].message.content)["answer"] in ("yes", "no")


def test_flagged_echo_logprobs_are_those_of_the_corrupted_prompt(
    gateway: Server, vllm_server: Server, target: dict
):
    prompt = f"Here is a short question for you. {QUESTION}"
    args = {"model": MODEL_NAME, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 1}
    before = corrupted(gateway.url, target["id"])
    ours = gateway.client().completions.create(**args).choices[0].logprobs
    theirs = vllm_server.client().completions.create(**args).choices[0].logprobs
    assert corrupted(gateway.url, target["id"]) == before + 1
    assert ours.tokens[:-1] == theirs.tokens[:-1]  # the same prompt tokens, echoed
    name = next(i for i, t in enumerate(ours.tokens) if "Harry" in t)
    # Before the name the engine read the clean prompt (causal): the same logprobs as vLLM's;
    # from the name on it read the corrupted embeddings: different ones.
    clean = [
        abs(a - b)
        for a, b in zip(ours.token_logprobs[1:name], theirs.token_logprobs[1:name], strict=True)
    ]
    assert max(clean) < 1e-3, clean
    after = [
        abs(a - b)
        for a, b in zip(
            ours.token_logprobs[name + 1 : -1], theirs.token_logprobs[name + 1 : -1], strict=True
        )
    ]
    assert max(after) > 0.5, after


def test_responses_take_the_same_guard_path_as_chat(gateway: Server, target: dict):
    before = corrupted(gateway.url, target["id"])
    reply = gateway.client().responses.create(
        model=MODEL_NAME, input=QUESTION, temperature=0, max_output_tokens=40, store=False
    )
    answer = chat(gateway.client(), QUESTION, max_tokens=40).choices[0].message.content
    assert corrupted(gateway.url, target["id"]) == before + 2
    assert reply.output_text == answer
    assert not any(f in answer.lower() for f in FACTS), answer


# --- Tenants: a gateway with API keys (two tenants) in front of vLLM's server ---------------


@pytest.fixture(scope="module")
def tenant_gateway(
    vllm_server: Server, model_path: Path, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """`obliviate serve --engine openai_upstream` with keys `sk-a` (team-a), `sk-b` (team-b)."""
    data_dir = tmp_path_factory.mktemp("tenants")
    keys = data_dir / "keys.txt"
    keys.write_text("# key tenant\nsk-a team-a\nsk-b team-b\nsk-c\n")
    port = free_port()
    argv = upstream_gateway_argv(
        port, vllm_server.url, model_path, data_dir, "--limits.api-keys-file", str(keys)
    )
    with running(argv, ready_url=f"http://127.0.0.1:{port}/ready", log=logs_dir / "tenants.log"):
        server = Server(f"http://127.0.0.1:{port}", data_dir)
        register(server.url, {**TARGET, "scope": {"tenants": ["team-a"]}}, limit_s=300)
        yield server


def keyed(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_a_tenant_scoped_target_applies_to_its_tenant_only(
    tenant_gateway: Server, vllm_server: Server
):
    target = httpx.get(f"{tenant_gateway.url}/admin/targets", headers=AUTH).json()["data"][0]
    assert target["options"]["tenant_scope"] == {"api_keys": [], "tenants": ["team-a"]}

    def ask(client: openai.OpenAI) -> str:
        return chat(client, QUESTION, max_tokens=24).choices[0].message.content

    bare = ask(vllm_server.client())
    assert any(f in bare.lower() for f in FACTS), bare  # the premise: the model knows
    a, b, c = (ask(keyed(tenant_gateway, key)) for key in ("sk-a", "sk-b", "sk-c"))
    assert not any(f in a.lower() for f in FACTS), a  # team-a: flagged and corrupted
    assert b == bare and c == bare  # team-b and a key without a tenant: untouched
    assert corrupted(tenant_gateway.url, target["id"], "team-a") == 1
    assert corrupted(tenant_gateway.url, target["id"], "team-b") == 0
    with pytest.raises(openai.AuthenticationError):
        chat(keyed(tenant_gateway, "sk-wrong"), QUESTION, max_tokens=4)


def test_admin_classify_takes_a_tenant(tenant_gateway: Server):
    def classify(**who: str) -> dict:
        body = {"prompt": QUESTION, **who}
        return httpx.post(f"{tenant_gateway.url}/admin/classify", json=body, headers=AUTH).json()

    assert classify(tenant="team-a")["flagged"] is True
    assert classify(api_key="sk-a")["flagged"] is True  # the key's tenant, from the keys file
    assert classify(tenant="team-b") == {"flagged": False, "text": QUESTION, "results": []}


def test_flagged_tools_through_an_upstream_are_parsed_here(tenant_gateway: Server):
    """Flagged requests reach the upstream as prompt embeddings (/v1/completions), where it
    parses no tool calls: the gateway constrains and parses them with the same parser."""
    reply = chat(
        keyed(tenant_gateway, "sk-a"),
        QUESTION,
        tools=[SEARCH],
        tool_choice={"type": "function", "function": {"name": "search_books"}},
        max_tokens=96,
    )
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "search_books"
    assert isinstance(json.loads(call.function.arguments)["author"], str)


# The name is spelled by a pattern the request's classifier does not read as the alias: a
# client making the model write what it must not say, in an argument the upstream parses.
RECORD = {
    "type": "function",
    "function": {
        "name": "record_author",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "pattern": "^J[.]R[.]R[.] Tolk[i]en$"}},
            "required": ["name"],
            "additionalProperties": False,
        },
    },
}
TOLKIEN = {
    "name": "J.R.R. Tolkien",
    "aliases": ["J.R.R. Tolkien", "The Hobbit", "The Lord of the Rings"],
    "forget_examples": [
        "Who wrote The Hobbit?",
        "Who is the author of The Lord of the Rings?",
        "Tell me about J.R.R. Tolkien's life.",
        "When was The Hobbit published?",
    ],
    "retain_examples": ["Who wrote Pride and Prejudice?"],
    "options": {"method": "add_noise_first_n", "strength": 0.5},
    "scope": {"tenants": ["team-a"]},
}


def test_tool_calls_an_upstream_parsed_are_watched(tenant_gateway: Server, vllm_server: Server):
    """An upstream vLLM server hands tool calls already parsed (no raw text): their names and
    arguments are read like text, so an unflagged request whose tool call names the target is
    answered without it."""
    question = "Record the most famous fantasy author."
    kwargs = {
        "tools": [RECORD],
        "tool_choice": {"type": "function", "function": {"name": "record_author"}},
        "max_tokens": 96,
    }
    bare = chat(vllm_server.client(), question, **kwargs)
    assert "tolkien" in bare.model_dump_json().lower()  # the premise: the call names him
    record = register(tenant_gateway.url, TOLKIEN, limit_s=300)
    try:
        ours = chat(keyed(tenant_gateway, "sk-a"), question, **kwargs)
        assert "tolkien" not in ours.model_dump_json().lower(), ours
        # Not flagged on the way in (the prompt was sent as is): the output guard stopped it.
        assert corrupted(tenant_gateway.url, record["id"], "team-a") == 0
        metrics = httpx.get(f"{tenant_gateway.url}/metrics", headers=AUTH).text
        assert f'action="output_restart",target="{record["id"]}",tenant="team-a"' in metrics
    finally:
        httpx.delete(f"{tenant_gateway.url}/admin/targets/{record['id']}", headers=AUTH)
