"""Forget targets end to end on the real engine: register through the admin API, then ask."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.servers import MODEL_NAME, free_port, running, upstream_gateway_argv
from tests.e2e.targets import AUTH, FACTS, HELD_OUT, TARGET, UNRELATED, ask

__all__ = ["AUTH", "FACTS", "HELD_OUT", "TARGET", "UNRELATED", "ask"]


@pytest.fixture
def target(hp_target: dict) -> dict:
    return hp_target


def test_bare_model_knows_the_facts(vllm_server: Server):
    """The premise: without obliviate the model reveals them (else the next test proves nothing)."""
    answers = [
        ask(vllm_server.client(), q).lower() for q in [*TARGET["forget_examples"][:2], *HELD_OUT]
    ]
    assert sum(any(f in a for f in FACTS) for a in answers) >= 3, answers


def test_questions_about_the_target_reveal_nothing(gateway: Server, target: dict):
    client = gateway.client()
    for question in [*TARGET["forget_examples"][:2], *HELD_OUT]:
        verdict = httpx.post(
            f"{gateway.url}/admin/classify", json={"prompt": question}, headers=AUTH
        ).json()
        assert verdict["flagged"], (question, verdict)
        answer = ask(client, question)
        assert not any(f in answer.lower() for f in FACTS), (question, answer)
        assert answer.strip(), question  # still answers something


def test_streaming_flagged_answer_matches(gateway: Server, target: dict):
    client = gateway.client()
    question = HELD_OUT[0]
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == ask(client, question)


def test_follow_up_turn_is_flagged(gateway: Server, target: dict):
    messages = [
        {"role": "user", "content": "Tell me about Harry Potter."},
        {"role": "assistant", "content": "It is a series of fantasy novels."},
        {"role": "user", "content": "Who wrote them?"},
    ]
    verdict = httpx.post(f"{gateway.url}/admin/classify", json={"messages": messages}, headers=AUTH)
    assert verdict.json()["flagged"]
    reply = gateway.client().chat.completions.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=60
    )
    assert "rowling" not in (reply.choices[0].message.content or "").lower()


@pytest.mark.parametrize("question", UNRELATED)
def test_unrelated_questions_are_untouched(
    gateway: Server, vllm_server: Server, target: dict, question
):
    verdict = httpx.post(f"{gateway.url}/admin/classify", json={"prompt": question}, headers=AUTH)
    assert not verdict.json()["flagged"], verdict.json()
    assert ask(gateway.client(), question) == ask(vllm_server.client(), question)


def test_metrics_count_decisions(gateway: Server, target: dict):
    admitted = _metric(gateway.url, "obliviate_admission_seconds_count")
    ask(gateway.client(), HELD_OUT[1])
    ask(gateway.client(), UNRELATED[0])
    metrics = httpx.get(f"{gateway.url}/metrics", headers=AUTH).text
    assert (
        f'obliviate_guard_decisions_total{{action="corrupt",target="{target["id"]}",tenant="-"}}'
        in metrics
    )
    # Both prompts, flagged and not, timed from arrival until they went to the engine.
    assert _metric(gateway.url, "obliviate_admission_seconds_count") - admitted == 2


def test_the_startup_heap_is_frozen_and_collections_are_timed(gateway: Server):
    """Once its engine is up, the gateway moves the heap it built (torch, vLLM, the
    classifier: most of a million objects, which a full collection would walk while every
    request waits) into the permanent generation, as vLLM's own server does."""
    deadline = time.monotonic() + 60
    while _metric(gateway.url, "obliviate_gc_frozen_objects") < 200_000:
        assert time.monotonic() < deadline, "the heap was not frozen"
        time.sleep(1)
    ask(gateway.client(), UNRELATED[1])
    assert _metric(gateway.url, 'obliviate_gc_pause_seconds_count{generation="0"}') > 0


@pytest.mark.parametrize(
    "question",
    [
        "Who wrote H.a.r.r.y P.o.t.t.e.r?",
        "Who wrote the books about H a r r y P o t t e r?",
        "Who wrote H4rry P0tt3r, first published in 1997?",
    ],
)
def test_a_name_spelled_out_in_plain_ascii_is_read_and_corrupted(
    gateway: Server, target: dict, question: str
):
    """Plain ASCII skips the character-by-character de-obfuscation unless a word is spelled
    out letter by letter or a digit, @ or $ touches a letter (classifier.normalize; a number
    apart from letters, like the year here, does not count): such a prompt is still read as
    the name."""
    corrupted = _decisions(gateway.url, target["id"])
    answer = ask(gateway.client(), question).lower()
    assert not any(f in answer for f in FACTS), answer
    assert _decisions(gateway.url, target["id"]) - corrupted == 1


def test_a_name_split_in_two_is_read_and_corrupted(gateway: Server, target: dict):
    """Most prompts name no alias, and an ASCII one is ruled out by looking its words up
    before the classifier builds its word list (classifier.spans.AliasIndex.match); the
    lookups include each pair of words glued together, so an alias split in two ("Hog
    warts") is still read as the name and the prompt corrupted."""
    corrupted = _decisions(gateway.url, target["id"])
    answer = ask(gateway.client(), "Who wrote the books about the Hog warts school?").lower()
    assert not any(f in answer for f in FACTS), answer
    assert _decisions(gateway.url, target["id"]) - corrupted == 1


def _burst(client: openai.OpenAI, questions: list[str]) -> list[str]:
    """The questions sent at once, greedy, 16 tokens each: the answers in order."""
    with ThreadPoolExecutor(len(questions)) as pool:
        return list(pool.map(lambda q: ask(client, q, max_tokens=16), questions))


def test_a_burst_is_guarded_like_single_requests(
    gateway: Server, vllm_server: Server, target: dict
):
    """Requests sent at once are classified in batches: the static stage settles short
    unflagged ones on the event loop, and they come back byte-identical to vLLM's, as do long
    ones (read on the guard's thread); flagged ones, short and long (cut into windows), are all
    corrupted (on the thread, where MiniLM reads them, unless an earlier test's verdicts on
    them are cached)."""
    filler = "Please answer in one short sentence and keep to plain words. " * 40  # 2,480 chars
    plain = [*UNRELATED, "Tell me about bees.", "Tell me about glaciers."]
    plain.append(filler + "What is the capital of Italy?")
    on_loop, on_thread = _reads(gateway.url, "loop"), _reads(gateway.url, "thread")
    assert _burst(gateway.client(), plain) == _burst(vllm_server.client(), plain)
    assert _reads(gateway.url, "loop") - on_loop >= 3  # the short unflagged prompts
    assert _reads(gateway.url, "thread") - on_thread >= 1  # the long one
    flagged = [*HELD_OUT, filler + HELD_OUT[0]]
    corrupted = _decisions(gateway.url, target["id"])
    answers = _burst(gateway.client(), [*flagged, *plain[:3]])
    for question, answer in zip(flagged, answers, strict=False):
        assert not any(f in answer.lower() for f in FACTS), (question, answer)
    assert _decisions(gateway.url, target["id"]) - corrupted == len(flagged)


def test_each_caller_of_a_full_loop_batch_acts_on_its_own_verdict(
    gateway: Server, vllm_server: Server, target: dict, model_path: Path, logs_dir: Path
):
    """The static stage reads short prompts on the event loop in batches, a full batch at once
    in the step of the request that fills it (server.services.batching.LoopBatcher). With
    batches of 3 requests or 60 characters (a second gateway on the same registry, in front of
    vLLM's server), a burst of flagged and unflagged prompts in turn fills many, by count and by
    characters: each request acts on its own verdict, so the unflagged answers are vLLM's, byte
    for byte, and every flagged prompt is corrupted."""
    assert gateway.data_dir is not None
    port = free_port()
    argv = upstream_gateway_argv(
        port, vllm_server.url, model_path, gateway.data_dir,
        "--guard.loop-batch", "3",
        "--guard.loop-batch-chars", "60",
    )  # fmt: skip
    plain = [*UNRELATED, "Tell me about owls.", "Name a river in Asia.", "Why is the sky blue?"]
    flagged = [
        *HELD_OUT,
        "Who wrote the Harry Potter books?",
        "Who is the author of the Harry Potter series?",
        "Name the writer who created Harry Potter.",
        "Which author wrote Harry Potter and the Goblet of Fire?",
    ]
    burst = [q for pair in zip(plain, flagged, strict=True) for q in pair]
    log = logs_dir / "loop-batch.log"
    with running(argv, ready_url=f"http://127.0.0.1:{port}/ready", log=log):
        url = f"http://127.0.0.1:{port}"
        answers = dict(zip(burst, _burst(Server(url).client(), burst), strict=True))
        assert [answers[q] for q in plain] == _burst(vllm_server.client(), plain)
        for question in flagged:
            assert not any(f in answers[question].lower() for f in FACTS), answers[question]
        assert _decisions(url, target["id"]) == len(flagged)


def _reads(url: str, path: str) -> float:
    """Texts the guard read on `path` (loop or thread): prompts and the output guard's windows."""
    return _metric(url, f'obliviate_guard_reads_total{{path="{path}"}}')


def _decisions(url: str, target_id: str) -> float:
    key = f'obliviate_guard_decisions_total{{action="corrupt",target="{target_id}",tenant="-"}}'
    return _metric(url, key)


def _metric(url: str, key: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    found = re.search("^" + re.escape(key) + r" (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_restart_keeps_targets_and_upstream_engine_protects_too(
    gateway: Server, vllm_server: Server, target: dict, model_path: Path, logs_dir: Path
):
    """A second gateway on the same registry (a restart), in front of vLLM's server this time."""
    assert gateway.data_dir is not None
    port = free_port()
    argv = upstream_gateway_argv(port, vllm_server.url, model_path, gateway.data_dir)
    with running(argv, ready_url=f"http://127.0.0.1:{port}/ready", log=logs_dir / "restart.log"):
        url = f"http://127.0.0.1:{port}"
        record = httpx.get(f"{url}/admin/targets/{target['id']}", headers=AUTH).json()
        assert record["active"] and record["version"] == target["version"]
        client = Server(url).client()
        answer = ask(client, HELD_OUT[2])
        assert not any(f in answer.lower() for f in FACTS), answer
        assert ask(client, UNRELATED[0]) == ask(vllm_server.client(), UNRELATED[0])
