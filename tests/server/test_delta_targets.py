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
from server.app import create_app
from server.engine import ChatPrompt
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN
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
