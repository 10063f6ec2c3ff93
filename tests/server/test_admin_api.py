"""The admin API on the fake engine with the real classifier and a real SQLite registry."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HARRY = {
    "name": "Harry Potter",
    "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling"],
    "forget_examples": [
        "Who wrote Harry Potter?",
        {"prompt": "What is the name of Harry Potter's school?", "answer": "Hogwarts."},
        "Who are Harry Potter's best friends?",
        "What position does Harry Potter play in Quidditch?",
    ],
    "retain_examples": ["Who wrote The Lord of the Rings?"],
}


def wait_for_job(client: TestClient, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("admin")
    return Settings(
        data_dir=root / "data", model_cache_dir=root / "models", admin_token=ADMIN_TOKEN
    )


@pytest.fixture(scope="module")
def client(module_settings: Settings) -> Iterator[TestClient]:
    """One app (and one trained target) for the module: training takes seconds."""
    with TestClient(create_app(module_settings, engine=FakeEngine())) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def registered(client: TestClient) -> dict:
    response = client.post("/admin/targets", json=HARRY, headers=AUTH)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/admin/jobs/{job['id']}"
    assert job["object"] == "job" and job["status"] in ("queued", "running")
    done = wait_for_job(client, job["id"])
    assert done["status"] == "succeeded", done
    return client.get(f"/admin/targets/{job['target_id']}", headers=AUTH).json()


def test_register_then_inspect(client: TestClient, registered: dict):
    assert registered["status"] == "active" and registered["active"] is True
    assert registered["version"] == 1
    assert 0 < registered["threshold"] < 1
    report = registered["calibration"]["classifier"]
    assert report["heldout_recall"] >= 0.9
    assert registered["calibration"]["corruption"]["spec"]["method"]
    listed = client.get("/admin/targets", headers=AUTH).json()
    assert [t["id"] for t in listed["data"]] == [registered["id"]]


def test_dry_run_classify(client: TestClient, registered: dict):
    about = client.post(
        "/admin/classify",
        json={"prompt": "Which house at hogwarts was Harry Potter sorted into?"},
        headers=AUTH,
    ).json()
    assert about["flagged"] is True
    result = about["results"][0]
    assert result["target_id"] == registered["id"] and result["score"] > result["threshold"]
    assert {s["text"].lower() for s in result["spans"]} >= {"hogwarts", "harry potter"}
    other = client.post(
        "/admin/classify", json={"prompt": "How do I bake sourdough bread?"}, headers=AUTH
    ).json()
    assert (
        other["flagged"] is False
        and other["results"][0]["score"] < other["results"][0]["threshold"]
    )


def test_follow_up_turn_stays_flagged(client: TestClient, registered: dict):
    messages = [
        {"role": "user", "content": "Tell me about Harry Potter."},
        {"role": "assistant", "content": "He is a wizard."},
        {"role": "user", "content": "And when was he born?"},
    ]
    result = client.post("/admin/classify", json={"messages": messages}, headers=AUTH).json()
    assert result["flagged"] is True


def test_disable_enable_threshold_override(client: TestClient, registered: dict):
    target = f"/admin/targets/{registered['id']}"
    probe = {"prompt": "Who wrote Harry Potter?"}
    off = client.patch(target, json={"enabled": False}, headers=AUTH).json()
    assert off["enabled"] is False and off["active"] is False
    assert client.post("/admin/classify", json=probe, headers=AUTH).json()["results"] == []
    client.patch(target, json={"enabled": True}, headers=AUTH)
    strict = client.patch(target, json={"threshold": 0.999999}, headers=AUTH).json()
    assert strict["threshold"] == pytest.approx(0.999999)
    cleared = client.patch(target, json={"threshold": None}, headers=AUTH).json()
    assert cleared["threshold"] == pytest.approx(registered["threshold"])


def test_flagged_requests_without_local_model_are_refused(client: TestClient, registered: dict):
    chat = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "Who wrote Harry Potter?"}],
    }
    response = client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 503
    unrelated = {**chat, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    assert client.post("/v1/chat/completions", json=unrelated).status_code == 200


def test_token_prompts_without_a_tokenizer_are_refused(client: TestClient, registered: dict):
    body = {"model": "fake-model", "prompt": [1, 2, 3], "max_tokens": 2}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_targets_survive_a_restart(module_settings: Settings, registered: dict):
    app = create_app(module_settings, engine=FakeEngine())
    with TestClient(app) as again:
        record = again.get(f"/admin/targets/{registered['id']}", headers=AUTH).json()
        assert record["active"] is True and record["version"] == 1
        probe = again.post(
            "/admin/classify", json={"prompt": "Who wrote Harry Potter?"}, headers=AUTH
        )
        assert probe.json()["flagged"] is True


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-000000000"}, {"Authorization": ADMIN_TOKEN}],
)
def test_missing_or_wrong_token_is_401(client: TestClient, headers):
    for method, path in [
        ("get", "/admin/targets"),
        ("post", "/admin/targets"),
        ("get", "/admin/x"),
    ]:
        response = client.request(method, path, headers=headers, json=HARRY)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"forget_examples": []}, "forget_examples"),
        ({"name": " "}, "name"),
        ({"mode": "magic"}, "mode"),
        ({"options": {"fpr": 2}}, "options.fpr"),
        ({"colour": "red"}, "colour"),
        ({"mode": "delta"}, "options"),  # no small base: the fake engine has no local model
        ({"mode": "delta", "options": {"small_base": "/nonexistent"}}, "options"),
        ({"mode": "delta", "options": {"scope": "some"}}, "options.scope"),
        ({"mode": "delta", "options": {"alpha": 0}}, "options.alpha"),
    ],
)
def test_bad_registrations_are_400(client: TestClient, patch, param):
    before = client.get("/admin/targets", headers=AUTH).json()["data"]
    response = client.post(
        "/admin/targets", json={**HARRY, "name": "Another", **patch}, headers=AUTH
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.get("/admin/targets", headers=AUTH).json()["data"] == before


def test_duplicate_name_is_409(client: TestClient, registered: dict):
    response = client.post("/admin/targets", json=HARRY, headers=AUTH)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "target_exists"


def test_unknown_ids_are_404(client: TestClient):
    assert client.get("/admin/targets/nope", headers=AUTH).status_code == 404
    assert client.get("/admin/jobs/nope", headers=AUTH).status_code == 404
    assert (
        client.patch("/admin/targets/nope", json={"enabled": False}, headers=AUTH).status_code
        == 404
    )


def test_refuses_to_start_without_token(tmp_path):
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match="OBLIVIATE_ADMIN_TOKEN"):
        Settings(data_dir=tmp_path)
    assert Settings(data_dir=tmp_path, admin_insecure_dev=True).admin_token is None
    assert Settings(data_dir=tmp_path, admin_enabled=False).admin_enabled is False


def test_delete(client: TestClient, registered: dict):
    assert client.delete(f"/admin/targets/{registered['id']}", headers=AUTH).status_code == 204
    assert client.get(f"/admin/targets/{registered['id']}", headers=AUTH).status_code == 404
    assert client.delete(f"/admin/targets/{registered['id']}", headers=AUTH).status_code == 404
