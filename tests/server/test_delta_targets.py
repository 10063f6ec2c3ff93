"""δ targets through the admin API and the request path, on the fake engine.

The engine here only records what it was asked; the offsets themselves are tested on vLLM
(tests/offset/test_vllm_processor.py, tests/e2e/test_delta_mode.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from offset import DeltaSpec
from offset.alpha import ALPHAS
from server.app import create_app
from server.engine import ChatPrompt
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.e2e.targets import ALPHA_EXAMPLES, ALPHA_PROBES
from tests.offset.conftest import tiny_smollm_folders
from tests.server.test_admin_api import AUTH, HARRY, wait_for_job


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llamas with SmolLM2's vocabulary and tokenizer (the trainer needs a tokenizer)."""
    specs = {"base": (0, 49152), "unlearned": (1, 49152), "other": (2, 64)}
    return tiny_smollm_folders(tmp_path_factory.mktemp("tiny"), specs)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("delta")
    return Settings(data_dir=root / "data", model_cache_dir=root / "m", admin_token=ADMIN_TOKEN)


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def client(settings: Settings, engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as test_client:
        yield test_client


def _register(client: TestClient, body: dict) -> dict:
    response = client.post("/admin/targets", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    return client.get(f"/admin/targets/{job['target_id']}", headers=AUTH).json()


@pytest.fixture(scope="module")
def harry(client: TestClient, models: dict[str, Path]) -> dict:
    options = {
        "small_base": str(models["base"]),
        "unlearned_model": str(models["unlearned"]),
        "alpha": 0.7,
    }
    return _register(client, {**HARRY, "mode": "delta", "options": options})


def _ask(client: TestClient, engine: FakeEngine, question: str) -> tuple[object, tuple]:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": question}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    request = engine.history[-1]
    return request.prompt, request.offsets


def test_flagged_requests_carry_the_offset_and_keep_their_prompt(
    client: TestClient, engine: FakeEngine, harry: dict, models: dict[str, Path]
) -> None:
    assert harry["mode"] == "delta" and harry["active"]
    assert harry["calibration"]["offset"]["trained"] is False
    prompt, offsets = _ask(client, engine, "Can you name the writer of the Harry Potter novels?")
    assert isinstance(prompt, ChatPrompt)  # delta alone does not corrupt
    (spec,) = offsets
    assert isinstance(spec, DeltaSpec) and spec.alpha == 0.7
    # The folders come from the registry's copy (every replica has one), byte for byte.
    for used, given in ((spec.unlearned, models["unlearned"]), (spec.base, models["base"])):
        assert Path(used).parent.name == "cache"
        weights = "model.safetensors"
        assert (Path(used) / weights).read_bytes() == (given / weights).read_bytes()


def test_unflagged_requests_are_untouched_when_the_scope_is_flagged(
    client: TestClient, engine: FakeEngine, harry: dict
) -> None:
    for question in ("What is the capital of France?", "Who wrote The Lord of the Rings?"):
        prompt, offsets = _ask(client, engine, question)
        assert offsets == () and isinstance(prompt, ChatPrompt)


def test_logprobs_of_a_delta_request_are_refused_not_leaked(
    client: TestClient, engine: FakeEngine, harry: dict
) -> None:
    # The engine's logprobs are the big model's before the offset: they would name the answer.
    asked = len(engine.history)
    question = [{"role": "user", "content": "Who wrote Harry Potter?"}]
    for route, body in (
        ("/v1/chat/completions", {"messages": question, "logprobs": True, "top_logprobs": 5}),
        ("/v1/completions", {"prompt": "Harry Potter was written by", "logprobs": 5}),
    ):
        response = client.post(route, json={"model": "fake-model", **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "logprobs" and "δ mode" in error["message"]
    assert len(engine.history) == asked  # refused before the engine saw it
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "logprobs": True,
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # unflagged: as usual


def test_scope_all_applies_to_every_request(
    client: TestClient, engine: FakeEngine, harry: dict, models: dict[str, Path]
) -> None:
    narnia = {
        "name": "Narnia",
        "aliases": ["Narnia", "Aslan"],
        "forget_examples": ["Who rules Narnia?", "What is Aslan?"],
        "mode": "delta",
        "options": {
            "small_base": str(models["base"]),
            "unlearned_model": str(models["unlearned"]),
            "scope": "all",
            "alpha": 2.0,
        },
    }
    target = _register(client, narnia)
    try:
        _, offsets = _ask(client, engine, "What is the capital of France?")
        assert [o.alpha for o in offsets] == [2.0]
        _, offsets = _ask(client, engine, "Who wrote Harry Potter?")
        assert sorted(o.alpha for o in offsets) == [0.7, 2.0]
    finally:
        client.delete(f"/admin/targets/{target['id']}", headers=AUTH)
    _, offsets = _ask(client, engine, "What is the capital of France?")
    assert offsets == ()


def test_delta_targets_survive_a_restart(settings: Settings, harry: dict) -> None:
    engine = FakeEngine()
    with TestClient(create_app(settings, engine=engine)) as again:
        _, offsets = _ask(again, engine, "Who are Harry Potter's best friends?")
        assert [o.alpha for o in offsets] == [0.7]


@pytest.mark.parametrize(
    "options",
    [
        {"small_base": "base", "unlearned_model": "other"},  # another vocabulary
        {"small_base": "base", "unlearned_model": "/nonexistent"},
        {"small_base": "/nonexistent"},
    ],
)
def test_bad_delta_models_are_400(
    client: TestClient, models: dict[str, Path], options: dict[str, str]
) -> None:
    given = {k: str(models.get(v, v)) for k, v in options.items()}
    body = {**HARRY, "name": "Bad", "mode": "delta", "options": given}
    response = client.post("/admin/targets", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "options"


def test_registration_trains_a_snap_model(
    client: TestClient, engine: FakeEngine, settings: Settings, models: dict[str, Path]
) -> None:
    """No unlearned model given: the job runs `offset.snap` on the small base, in a child; a
    forget example's given answer is trained on as a document to forget (NPO), and the file
    that carried it to the child is removed."""
    known = {"prompt": "Who is Harry Potter's godfather?", "answer": "Sirius Black."}
    body = {
        **HARRY,
        "forget_examples": [*HARRY["forget_examples"], known],
        "name": "Trained",
        "mode": "delta",
        "options": {
            "small_base": str(models["base"]),
            "snap_max_steps": 2,
            "snap_train_vocab": False,
        },
    }
    target = _register(client, body)
    try:
        report = target["calibration"]["offset"]
        assert report["trained"] is True and report["steps"] == 2
        folder = Path(report["unlearned_model"])
        assert folder.parent == (settings.data_dir / "offsets" / "cache").resolve()
        card = json.loads((folder / "training_card.json").read_text(encoding="utf-8"))
        assert card["target"]["name"] == "Trained" and card["data"]["hard_positives"] == 1
        assert card["data"]["forget"] >= len(HARRY["forget_examples"])
        assert card["config"]["train_vocab"] is False  # the option reached the trainer
        assert card["data"]["documents"] == 2 and "documents" in card["losses"][-1]  # 1 + known
        assert not list((settings.data_dir / "offsets").rglob("*.documents.jsonl"))
    finally:
        client.delete(f"/admin/targets/{target['id']}", headers=AUTH)


def _auto(models: dict[str, Path], **changes: object) -> dict:
    body = {
        "name": "Harry Potter (α searched)",
        "aliases": ["Harry Potter", "Hogwarts"],
        "forget_examples": ALPHA_EXAMPLES,
        "mode": "delta",
        "options": {
            "small_base": str(models["base"]),
            "unlearned_model": str(models["unlearned"]),
            "alpha": "auto",
            "alpha_probes": ALPHA_PROBES,
        },
    }
    return {**body, **changes}


def test_alpha_auto_is_searched_recorded_and_served(
    client: TestClient, engine: FakeEngine, settings: Settings, harry: dict, models: dict[str, Path]
) -> None:
    """alpha 'auto': the job scores every grid α on the examples against the probes' level,
    keeps the nearest (offset.alpha) and the requests carry it, also after a restart."""
    target = _register(client, _auto(models))
    try:
        search = target["calibration"]["offset"]["alpha_search"]
        table = {float(a): row for a, row in search["by_alpha"].items()}
        assert sorted(table) == list(ALPHAS)
        assert search["examples"] == len(ALPHA_EXAMPLES) and search["probes"] == len(ALPHA_PROBES)
        low, high = search["interval_80"]
        assert low <= search["alpha"] <= high and low in table and high in table
        # Random tiny models move the ratios with α: the grid is not one flat row.
        assert len({round(row["median_log_r"], 6) for row in table.values()}) > 1
        best = max(table.values(), key=lambda row: row["ks_p"])["ks_p"]
        assert table[search["alpha"]]["ks_p"] == best
        _, offsets = _ask(client, engine, "Can you name the writer of the Harry Potter novels?")
        assert sorted(o.alpha for o in offsets) == sorted([0.7, search["alpha"]])
        again = FakeEngine()
        with TestClient(create_app(settings, engine=again)) as restarted:
            _, offsets = _ask(restarted, again, "Who are Harry Potter's best friends?")
            assert sorted(o.alpha for o in offsets) == sorted([0.7, search["alpha"]])
    finally:
        client.delete(f"/admin/targets/{target['id']}", headers=AUTH)


def _without_wrong(example: dict) -> dict:
    return {k: v for k, v in example.items() if k != "wrong_answers"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "eco"}, "δ option"),
        ({"probes": ALPHA_PROBES[:9]}, "at least 10 alpha_probes"),
        ({"examples": [*ALPHA_EXAMPLES[:9], _without_wrong(ALPHA_EXAMPLES[9])]}, "(9 given)"),
        ({"alpha": 1.0}, "read by alpha 'auto' only"),
        ({"alpha": 1.0, "probes": None}, "read by alpha 'auto' only"),  # examples' wrong answers
        ({"examples": [{"prompt": "Who wrote it?", "wrong_answers": ["Nobody."]}]}, "answer"),
        ({"probes": [{**ALPHA_PROBES[0], "wrong_answers": []}] * 10}, "at least 1 item"),
    ],
)
def test_alpha_auto_without_what_it_reads_is_400(
    client: TestClient, models: dict[str, Path], change: dict, message: str
) -> None:
    body = _auto(models)
    if "mode" in change:
        body["mode"] = change["mode"]
    if "alpha" in change:
        body["options"]["alpha"] = change["alpha"]
    if "probes" in change:
        body["options"]["alpha_probes"] = change["probes"]
    if "examples" in change:
        body["forget_examples"] = change["examples"]
    response = client.post("/admin/targets", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"], response.json()


def test_alpha_auto_examples_are_held_out_of_snap_training(
    client: TestClient, models: dict[str, Path]
) -> None:
    """The examples the α search scores are questions the SNAP copy never trained on (neither
    refused nor unlearned with NPO), as users' questions will be; an answered example without
    wrong answers is still a document to unlearn."""
    known = {"prompt": "Who is Harry Potter's godmother?", "answer": "He has none."}
    snap = {"small_base": str(models["base"]), "snap_max_steps": 2, "snap_train_vocab": False}
    auto = _auto(models, name="Held out", forget_examples=[*ALPHA_EXAMPLES, known])
    auto["options"] = {**snap, "alpha": "auto", "alpha_probes": ALPHA_PROBES}
    plain = {
        **auto,
        "name": "Trained on all",
        "forget_examples": [*map(_without_wrong, ALPHA_EXAMPLES), known],
        "options": snap,
    }
    cards = {}
    for body in (auto, plain):
        target = _register(client, body)
        try:
            folder = Path(target["calibration"]["offset"]["unlearned_model"])
            cards[body["name"]] = json.loads((folder / "training_card.json").read_text())["data"]
        finally:
            client.delete(f"/admin/targets/{target['id']}", headers=AUTH)
    held, all_ = cards["Held out"], cards["Trained on all"]
    assert all_["forget"] - held["forget"] == len(ALPHA_EXAMPLES)
    assert all_["documents"] - held["documents"] == len(ALPHA_EXAMPLES)
    assert held["documents"] >= 1  # the example without wrong answers
