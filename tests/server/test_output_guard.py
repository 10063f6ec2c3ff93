"""The output guard on the fake engine (scripted answers), with the real classifier and the served
model's tokenizer and embeddings: names never leave, the answer continues from a protected
restart, unflagged answers come out as generated. The real engine: tests/e2e/test_leaks.py."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from classifier import Decision
from server.app import create_app
from server.engine import ChatPrompt, PromptEmbeds, TextPrompt
from server.engine.fake import FakeEngine, FakeToolCall
from server.services.guard import EcoGuard
from server.settings import GuardSettings, Settings
from tests.conftest import ADMIN_TOKEN
from tests.server.test_admin_api import AUTH, HARRY, wait_for_job

PLAIN = "What is the best-selling fantasy series of all time, and who wrote it?"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from server.modelstore import resolve_model

    try:
        return resolve_model(None, auto_pull=True)
    except Exception as e:  # no packaged model here: nothing to corrupt with
        pytest.skip(f"the default model cannot be had here: {e}")


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, engine: FakeEngine
) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("output-guard") / "data",
        model=str(model_dir),
        admin_token=ADMIN_TOKEN,
        guard=GuardSettings(calibrate_strength=False, output_restarts=2),
    )
    with TestClient(create_app(settings, engine=engine)) as test_client:
        job = test_client.post("/admin/targets", json=HARRY, headers=AUTH).json()
        assert wait_for_job(test_client, job["id"], timeout=600)["status"] == "succeeded"
        yield test_client


def chat(content: str, **extra: object) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


def stream_text(client: TestClient, body: dict) -> tuple[list[str], list[str | None]]:
    pieces: list[str] = []
    finishes: list[str | None] = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                pieces.append(choice["delta"].get("content") or "")
                finishes.append(choice.get("finish_reason"))
    return pieces, finishes


def test_an_answer_naming_nobody_is_released_as_generated(client: TestClient, engine: FakeEngine):
    engine.enqueue("The best-selling series is about a young detective in Paris.")
    reply = client.post("/v1/chat/completions", json=chat(PLAIN, max_tokens=40)).json()
    assert reply["choices"][0]["message"]["content"] == (
        "The best-selling series is about a young detective in Paris."
    )
    assert isinstance(engine.history[-1].prompt, ChatPrompt)  # one request, untouched


def test_a_name_the_model_writes_unprompted_never_leaves(client: TestClient, engine: FakeEngine):
    before = len(engine.history)
    engine.enqueue("It is Harry Potter by J.K. Rowling.", " is a series by a British author.")
    reply = client.post("/v1/chat/completions", json=chat(PLAIN, max_tokens=40)).json()
    text = reply["choices"][0]["message"]["content"]
    assert text == "It is a series by a British author."
    assert "Harry" not in text and "Rowling" not in text
    first, restart = engine.history[-2:]
    assert len(engine.history) == before + 2
    # One answer for the client: the engine streams it in chunks, the first token alone (as
    # vLLM's stream_interval), and the restart too.
    assert first.stream and first.stream_every == restart.stream_every == 16
    # The continuation: prompt + released text as corrupted embeddings, the names banned.
    assert isinstance(restart.prompt, PromptEmbeds)
    assert "Harry Potter" in restart.sampling.bad_words and "Rowling" in restart.sampling.bad_words
    assert restart.sampling.max_tokens == 40 - 1  # "It", the first chunk, was released


def test_streams_hold_back_only_a_possible_name(client: TestClient, engine: FakeEngine):
    engine.enqueue("Harry went home and Harry Potter slept.", " nobody slept.")
    pieces, finishes = stream_text(client, chat(PLAIN, max_tokens=40))
    text = "".join(pieces)
    assert text == "Harry went home and nobody slept."
    assert finishes[-1] == "stop"
    # "Harry" waits for the next word; then goes out with it.
    assert "Harry" in pieces[1] and "went" in pieces[1]


def test_a_name_in_look_alike_letters_is_held_from_its_first_piece(
    client: TestClient, engine: FakeEngine
):
    """Cyrillic letters that look Latin, and no digit near: the scanner reads the answer's
    window in its de-obfuscated view, so the name goes out in no piece (the real engine,
    forced to write it by a client's constraint: tests/e2e/test_leaks.py)."""
    name = "\u041d\u0430rr\u0443 \u0420\u043ett\u0435r"
    engine.enqueue(f"The hero is {name} of the books.", " a boy of the books.")
    pieces, finishes = stream_text(client, chat(PLAIN, max_tokens=40))
    assert "".join(pieces) == "The hero is a boy of the books.", pieces
    assert finishes[-1] == "stop"


def test_each_choice_is_watched_on_its_own(client: TestClient, engine: FakeEngine):
    engine.enqueue("Ask Hogwarts alumni.", " a librarian.", " a teacher.")
    reply = client.post("/v1/chat/completions", json=chat(PLAIN, max_tokens=20, n=2)).json()
    texts = sorted(c["message"]["content"] for c in reply["choices"])
    # Both choices named it (the fake engine repeats its answer per choice); each restarted.
    assert texts == ["Ask a librarian.", "Ask a teacher."]


def test_after_the_last_restart_the_choice_ends_without_the_name(
    client: TestClient, engine: FakeEngine
):
    engine.enqueue("Rowling wrote it.", "Rowling wrote it.", "Rowling wrote it.")
    reply = client.post("/v1/chat/completions", json=chat(PLAIN, max_tokens=20)).json()
    choice = reply["choices"][0]
    assert "Rowling" not in (choice["message"]["content"] or "")
    assert choice["finish_reason"] == "stop"


def test_completions_are_watched_too(client: TestClient, engine: FakeEngine):
    engine.enqueue("J.K. Rowling, in 1997.", "an author, in 1997.")
    prompt = "The boy wizard books were written by"
    body = {"model": "fake-model", "prompt": prompt, "max_tokens": 9}
    reply = client.post("/v1/completions", json=body).json()
    assert reply["choices"][0]["text"] == "an author, in 1997."
    assert isinstance(engine.history[-2].prompt, TextPrompt)
    assert isinstance(engine.history[-1].prompt, PromptEmbeds)


def test_tool_calls_an_engine_hands_parsed_are_watched(client: TestClient, engine: FakeEngine):
    """An engine that parses tool calls itself (an upstream vLLM server) hands the name and the
    arguments with no raw text: they are what the model wrote, and are watched like text."""
    before = len(engine.history)
    engine.enqueue(
        FakeToolCall("search", json.dumps({"query": "Harry Potter by J.K. Rowling"})),
        FakeToolCall("search", json.dumps({"query": "a fantasy series"})),
    )
    tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    body = chat("Look up the author of the best-selling fantasy series.", tools=[tool])
    reply = client.post("/v1/chat/completions", json=body).json()
    calls = reply["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"query": "a fantasy series"}
    ]
    assert len(engine.history) == before + 2  # the naming call was never sent: a restart
    assert "Rowling" in engine.history[-1].sampling.bad_words


def test_a_name_among_the_logprobs_alternatives_never_leaves(
    client: TestClient, engine: FakeEngine
):
    """The top_logprobs alternatives are what the model would have written (taken before
    bad_words and logit_bias): one naming the target restarts the choice like written text."""
    before = len(engine.history)
    engine.alternatives = {" British": (" Rowling",)}
    try:
        engine.enqueue("A British author.", " woman.")
        body = chat(PLAIN, logprobs=True, top_logprobs=2, bad_words=["Rowling", " Rowling"])
        reply = client.post("/v1/chat/completions", json=body).json()
    finally:
        engine.alternatives = {}
    choice = reply["choices"][0]
    assert choice["message"]["content"] == "A woman."
    alternatives = [a["token"] for t in choice["logprobs"]["content"] for a in t["top_logprobs"]]
    assert alternatives and not any("Rowling" in a for a in alternatives), alternatives
    assert len(engine.history) == before + 2  # restarted before " British" was released


def test_a_stop_string_naming_the_target_is_never_reported(client: TestClient, engine: FakeEngine):
    """vLLM cuts a matched stop string out of the text and reports it as stop_reason: a client
    listing candidate names as stop strings would learn which one the model wrote next."""
    before = len(engine.history)
    engine.enqueue("created by J.K. Rowling in 1997.", " a British author.")
    body = {
        "model": "fake-model",
        "prompt": "The boy wizard with the lightning scar was created by",
        "stop": [" Rowling", " Tolkien", " Lewis"],
        "max_tokens": 20,
    }
    reply = client.post("/v1/completions", json=body).json()
    choice = reply["choices"][0]
    assert choice["stop_reason"] != " Rowling" and "Rowling" not in json.dumps(reply)
    # "J.K." was held (a possible name), and the 7 characters before it too (len(" Tolkien") - 1:
    # a stop string may start in them), so nothing had left: the restart starts afresh.
    assert choice["text"] == " a British author."
    assert len(engine.history) == before + 2  # restarted, protected, the name banned
    assert "Rowling" in engine.history[-1].sampling.bad_words
    assert engine.history[-2].sampling.stop == engine.history[-1].sampling.stop == ()


def test_a_stop_string_naming_nobody_is_reported_as_generated(
    client: TestClient, engine: FakeEngine
):
    engine.enqueue("created by a British author. More text.")
    body = {"model": "fake-model", "prompt": "The series was", "stop": [" More"], "max_tokens": 20}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
        "created by a British author.",
        "stop",
        " More",
    )


def test_a_one_letter_stop_string_tells_nothing_of_the_next_name(
    client: TestClient, engine: FakeEngine
):
    """Left to the engine, `stop: ["R"]` ends the answer at "J.K. " with stop reason "R": the
    next letter of a name the model never wrote, one request per letter. The gateway applies
    the stops to checked text only: the model writes on, the name gets the answer restarted."""
    before = len(engine.history)
    engine.enqueue("created by J.K. Rowling in 1997.", " a British author.")
    body = {
        "model": "fake-model",
        "prompt": "The boy wizard with the lightning scar was",
        "stop": ["R"],
        "max_tokens": 20,
    }
    reply = client.post("/v1/completions", json=body).json()
    choice = reply["choices"][0]
    assert (choice["text"], choice["stop_reason"]) == ("created by a British author.", None)
    assert len(engine.history) == before + 2  # restarted, protected
    assert engine.history[-2].sampling.stop == engine.history[-1].sampling.stop == ()


def test_stops_end_an_unflagged_answer_where_the_engine_would(
    client: TestClient, engine: FakeEngine
):
    body = {"model": "fake-model", "prompt": "The series was", "max_tokens": 20}
    engine.enqueue("created by a British author. More text.")
    reply = client.post("/v1/completions", json={**body, "stop": ["r. M", " text"]}).json()
    choice = reply["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
        "created by a British autho",
        "stop",
        "r. M",
    )
    assert reply["usage"]["completion_tokens"] == 6  # through " More", which completed it
    engine.enqueue("created by a British author. More text.")
    body |= {"stop": [" More"], "include_stop_str_in_output": True}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert (choice["text"], choice["stop_reason"]) == ("created by a British author. More", " More")
    # A stop token (the fake engine's ids count its words from 0): its text is left out.
    engine.enqueue("created by a British author. More text.")
    body = {"model": "fake-model", "prompt": "The series was", "stop_token_ids": [3]}
    reply = client.post("/v1/completions", json=body | {"max_tokens": 20}).json()
    choice = reply["choices"][0]
    assert (choice["text"], choice["stop_reason"]) == ("created by a", 3)
    assert reply["usage"]["completion_tokens"] == 4


def test_a_streamed_answer_never_sends_what_a_stop_cuts(client: TestClient, engine: FakeEngine):
    engine.enqueue("It is a detective story. The End of it.")
    pieces, finishes = stream_text(client, chat(PLAIN, max_tokens=40, stop=[". The End"]))
    assert "".join(pieces) == "It is a detective story"
    assert finishes[-1] == "stop"


def test_prompt_logprobs_naming_the_target_are_sent_again_protected(
    client: TestClient, engine: FakeEngine
):
    """The prompt logprobs' alternatives are the model's predictions at each prompt position:
    "Rowling" after "J.K." reveals the fact though the prompt names no target. The prompt is
    sent again, corrupted for the target, before anything leaves."""
    before = len(engine.history)
    engine.prompt_alternatives = {"S": ("Rowling",)}
    try:
        body = {
            "model": "fake-model",
            "prompt": "My favourite teacher was called J.K. Smith",
            "max_tokens": 3,
            "prompt_logprobs": 2,
        }
        reply = client.post("/v1/completions", json=body).json()
    finally:
        engine.prompt_alternatives = {}
    assert "Rowling" not in json.dumps(reply)
    assert reply["choices"][0]["prompt_logprobs"], reply
    first, again = engine.history[before:]
    assert isinstance(first.prompt, TextPrompt) and isinstance(again.prompt, PromptEmbeds)
    assert again.request_id.endswith("-prompt")


def test_prompt_logprobs_naming_nobody_come_from_the_prompt_as_sent(
    client: TestClient, engine: FakeEngine
):
    before = len(engine.history)
    engine.prompt_alternatives = {"S": ("Stevens",)}
    try:
        body = {"model": "fake-model", "prompt": "My teacher was Mr Smith", "max_tokens": 3}
        reply = client.post("/v1/completions", json={**body, "prompt_logprobs": 2}).json()
    finally:
        engine.prompt_alternatives = {}
    assert "Stevens" in json.dumps(reply)
    assert len(engine.history) == before + 1


def test_surnames_are_the_last_words_of_person_like_aliases() -> None:
    from server.services.output_guard import _surnames

    class T:
        def __init__(self, name: str, aliases: tuple[str, ...]) -> None:
            self.name, self.aliases = name, aliases

    got = _surnames(
        [
            T("J.R.R. Tolkien", ("The Hobbit", "The Lord of the Rings", "Middle-earth")),
            T("Harry Potter", ("Hogwarts", "J.K. Rowling", "Ron Weasley", "Al Li")),
        ]  # type: ignore[list-item]
    )
    assert got == {
        "Tolkien": "J.R.R. Tolkien",
        "Potter": "Harry Potter",
        "Rowling": "Harry Potter",
        "Weasley": "Harry Potter",
    }


def test_one_answer_comes_from_the_engine_in_chunks_unless_tokens_are_needed_one_by_one(
    client: TestClient, engine: FakeEngine
):
    """Watching an answer the client reads whole, the guard asks the engine for 16 tokens a
    chunk (fewer wake-ups of the event loop); a stream, and the client's stops (which end the
    answer at a token), take them one by one."""
    words = [f"word{i}" for i in range(40)]
    engine.enqueue(" ".join(words))
    reply = client.post("/v1/chat/completions", json=chat(PLAIN, max_tokens=60)).json()
    assert reply["choices"][0]["message"]["content"] == " ".join(words)
    assert reply["usage"]["completion_tokens"] == 40
    assert engine.history[-1].stream_every == 16
    engine.enqueue(" ".join(words))
    reply = client.post("/v1/chat/completions", json=chat(PLAIN, stop=["word30"])).json()
    assert reply["choices"][0]["message"]["content"] == " ".join(words[:30]) + " "
    assert engine.history[-1].stream_every == 1
    engine.enqueue(" ".join(words))
    pieces, _ = stream_text(client, chat(PLAIN))
    assert "".join(pieces) == " ".join(words)
    assert engine.history[-1].stream_every == 1


def test_a_stop_token_inside_a_merged_delta_ends_the_answer_there(model_dir: Path):
    """The output guard splits a delta of several tokens by the served model's tokenizer (as
    vLLM's detokenizer wrote it), so a client's stop token inside it ends the released text
    at that token: neither the text after it nor the tokens before it are lost."""
    from transformers import AutoTokenizer

    from server.engine import ChoiceDelta, SamplingOptions
    from server.services.corruptor import PromptCorruptor
    from server.services.output_guard import OutputGuard, _Choice
    from server.services.stops import GatewayStops

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    corruptor = PromptCorruptor(tokenizer, None)  # type: ignore[arg-type]
    ids = tokenizer("It was written 🌱 by a British author.", add_special_tokens=False).input_ids
    stop = tokenizer(" British", add_special_tokens=False).input_ids
    assert len(stop) == 1 and stop[0] in ids
    at = ids.index(stop[0])
    head, merged = ids[:3], ids[3:]  # released one by one before; then one merged delta
    rule, _ = GatewayStops.take(SamplingOptions(stop_token_ids=(stop[0],)))
    assert rule is not None
    st = _Choice(text=tokenizer.decode(ids), released=len(tokenizer.decode(head)))
    st.released_ids = list(head)
    st.held = [ChoiceDelta(0, tokenizer.decode(ids)[st.released :], merged)]

    def split(context, new):  # type: ignore[no-untyped-def]
        return corruptor.token_texts(context, new)

    out = OutputGuard._release(st, 0, final=True, stops=rule, split=split)
    assert out is not None and out.finish_reason == "stop" and out.stop_reason == stop[0]
    assert tokenizer.decode(head) + out.text == "It was written 🌱 by a"
    assert out.token_ids == ids[len(head) : at + 1]


def test_a_short_stretch_of_answer_is_read_with_the_words_before_it(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
):
    """At each sentence end the classifier reads the answer since its last read; a stretch
    of fewer than `output_window_words` (12) words is read with the words before it."""
    read: list[Sequence[str]] = []
    flagged = EcoGuard.flagged

    async def spy(self: EcoGuard, texts: Sequence[str]) -> list[Decision]:
        read.append(texts)
        return await flagged(self, texts)

    monkeypatch.setattr(EcoGuard, "flagged", spy)
    answer = (
        "Water moves between the sea, the air and the land in a cycle of four stages. "
        "They repeat.\n1. Evaporation\n2. Condensation"
    )
    engine.enqueue(answer)
    pieces, _ = stream_text(client, chat("How does water move?", max_tokens=60))
    assert "".join(pieces) == answer
    first = "Water moves between the sea, the air and the land in a cycle of four stages."
    assert [list(texts) for texts in read[1:]] == [  # read[0]: the prompt
        [first],  # 16 words: read alone
        # 3 new words (the engine's token ".\n1." ends a sentence): read with 9 before them
        ["and the land in a cycle of four stages. They repeat.\n1."],
        ["land in a cycle of four stages. They repeat.\n1. Evaporation\n2."],
        ["in a cycle of four stages. They repeat.\n1. Evaporation\n2. Condensation"],  # the end
    ]
