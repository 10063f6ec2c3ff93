"""Versioned targets, pinned corruption options and per-target isolation through the admin API.

The gateway runs the real classifier, a real SQLite registry and the real strength search on a
tiny llama with SmolLM2's tokenizer (hidden size 32); the engine is the fake one, which lets the
test hold a job at its "answers" stage (engine not ready) or make it fail (engine error).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from classifier import TargetClassifier
from server.app import create_app
from server.engine.fake import FakeEngine
from server.errors import EngineError
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.offset.conftest import tiny_smollm_folders
from tests.server.test_admin_api import AUTH, HARRY, wait_for_job

PROBE = {"prompt": "Who wrote the Harry Potter books?"}
SAM = {
    "name": "Samwise Gamgee",
    "aliases": ["Samwise Gamgee", "Sam Gamgee"],
    "forget_examples": ["Who is Samwise Gamgee?", "What does Samwise Gamgee do for a living?"],
}
FRODO = {
    "name": "Frodo Baggins",
    "aliases": ["Frodo Baggins", "Frodo"],
    "forget_examples": ["Who is Frodo Baggins?", "Where does Frodo Baggins live?"],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, FakeEngine, Path]]:
    root = tmp_path_factory.mktemp("versions")
    tiny = tiny_smollm_folders(root, {"tiny": (0, 49152)})["tiny"]
    settings = Settings(
        data_dir=root / "data",
        model_cache_dir=root / "m",
        model=str(tiny),
        admin_token=ADMIN_TOKEN,
        jobs={"poll_interval": 0.2},
    )
    engine = FakeEngine()
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client, engine, root / "data" / "registry.db"


def _target(client: TestClient, target_id: str) -> dict:
    response = client.get(f"/admin/targets/{target_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _flagged(client: TestClient, prompt: dict = PROBE) -> bool:
    return bool(client.post("/admin/classify", json=prompt, headers=AUTH).json()["flagged"])


@pytest.fixture(scope="module")
def harry(env) -> str:
    """Version 1: method and dims pinned, the strength searched on the tiny model."""
    client, _, _ = env
    body = {**HARRY, "options": {"method": "add_noise_random_n", "dims": 16}}
    response = client.post("/admin/targets", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json()["version"] == 1
    job = wait_for_job(client, response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    return str(job["target_id"])


def test_method_and_dims_pin_the_corruption_and_the_strength_is_searched(env, harry):
    client, _, _ = env
    target = _target(client, harry)
    corruption = target["calibration"]["corruption"]
    assert corruption["spec"]["method"] == "add_noise_random_n"
    assert corruption["spec"]["dims"] == 16
    assert corruption["searched"] is True  # the pinned-method branch of the search ran
    assert corruption["evaluations"] >= 1
    assert (target["version"], target["active_version"], target["status"]) == (1, 1, "active")


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"method": "no_such_method"}, "options.method"),
        ({"dims": 33}, "options.dims"),  # the tiny model has 32 hidden dims
        ({"method": "add_noise_first_n", "strength": -1.0}, "options.strength"),
    ],
)
def test_bad_corruption_options_are_400_before_any_job(env, options, param):
    client, _, _ = env
    body = {**HARRY, "name": "Bad options", "options": options}
    response = client.post("/admin/targets", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_new_version_is_built_while_the_old_one_is_enforced(env, harry):
    client, engine, _ = env
    engine._ready = False  # the job waits for the engine at its "answers" stage
    body = {**HARRY, "aliases": [*HARRY["aliases"], "The Boy Who Lived"]}
    body["options"] = {"strength": 2.5}
    response = client.put(f"/admin/targets/{harry}", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["version"], job["kind"], job["target_id"]) == (2, "update", harry)
    deadline = time.monotonic() + 120
    while client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()["stage"] != "answers":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    during = _target(client, harry)
    assert (during["status"], during["version"], during["active"]) == ("active", 1, True)
    assert during["pending_version"]["version"] == 2
    assert "The Boy Who Lived" not in during["aliases"]  # the active version's spec
    assert _flagged(client)  # version 1 is enforced all along
    again = client.put(f"/admin/targets/{harry}", json=body, headers=AUTH)
    assert again.status_code == 409 and again.json()["error"]["code"] == "version_pending"

    engine._ready = True
    assert wait_for_job(client, job["id"], timeout=300)["status"] == "succeeded"
    after = _target(client, harry)
    assert (after["version"], after["pending_version"]) == (2, None)
    assert "The Boy Who Lived" in after["aliases"]
    spec = after["calibration"]["corruption"]
    assert spec["spec"]["strength"] == 2.5 and spec["spec"]["method"] == "add_noise_first_n"
    assert spec["searched"] is False  # a given strength is used as it is
    assert _flagged(client)


def test_a_failed_version_leaves_the_active_one_and_says_why(env, harry):
    client, engine, _ = env
    engine.enqueue(EngineError("engine exploded"))  # the first bare answer fails
    response = client.put(f"/admin/targets/{harry}", json=HARRY, headers=AUTH)
    assert response.status_code == 202, response.text
    assert wait_for_job(client, response.json()["id"], timeout=300)["status"] == "failed"
    target = _target(client, harry)
    assert (target["status"], target["version"], target["active"]) == ("active", 2, True)
    assert target["failed_version"]["version"] == 3
    assert "engine exploded" in target["failed_version"]["error"]
    assert target["error"].startswith("version 3 failed")
    assert _flagged(client)


def test_rollback_and_the_version_list(env, harry):
    client, _, _ = env
    rolled = client.post(f"/admin/targets/{harry}/rollback", headers=AUTH)
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["version"] == 1 and rolled.json()["active"] is True
    assert "The Boy Who Lived" not in _target(client, harry)["aliases"]
    assert _flagged(client)
    versions = client.get(f"/admin/targets/{harry}/versions", headers=AUTH).json()["data"]
    assert [(v["version"], v["status"], v["active"]) for v in versions] == [
        (1, "ready", True),
        (2, "ready", False),
        (3, "failed", False),
    ]
    forward = client.post(f"/admin/targets/{harry}/rollback", json={"version": 2}, headers=AUTH)
    assert forward.status_code == 200 and forward.json()["version"] == 2
    failed = client.post(f"/admin/targets/{harry}/rollback", json={"version": 3}, headers=AUTH)
    assert failed.status_code == 409 and failed.json()["error"]["param"] == "version"
    missing = client.post("/admin/targets/nope/rollback", headers=AUTH)
    assert missing.status_code == 404


def test_a_target_is_enforced_as_soon_as_its_job_says_succeeded(env, harry, monkeypatch):
    # The registry's commit and the gateway's next turn are apart: a client polling the job
    # sees "succeeded" while finish_job's thread has not returned yet. Held open here.
    client, _, _ = env
    service = client.app.state.targets
    real = service._registry.finish_job
    finished = threading.Event()

    def slow_finish(*args, **kwargs):
        record = real(*args, **kwargs)
        finished.set()
        time.sleep(1.5)
        return record

    monkeypatch.setattr(service._registry, "finish_job", slow_finish)
    body = {**SAM, "options": {"strength": 1.0}}
    response = client.post("/admin/targets", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    job_id, sam = response.json()["id"], response.json()["target_id"]
    assert finished.wait(300)
    job = client.get(f"/admin/jobs/{job_id}", headers=AUTH).json()
    assert job["status"] == "succeeded"
    assert _target(client, sam)["active"] is True
    assert _flagged(client, {"prompt": "Where does Samwise Gamgee live?"})
    wait_for_job(client, job_id)
    assert client.delete(f"/admin/targets/{sam}", headers=AUTH).status_code == 204


def test_put_errors(env, harry):
    client, _, _ = env
    renamed = client.put(f"/admin/targets/{harry}", json={**HARRY, "name": "Other"}, headers=AUTH)
    assert renamed.status_code == 400 and renamed.json()["error"]["param"] == "name"
    assert client.put("/admin/targets/nope", json=HARRY, headers=AUTH).status_code == 404


def _tamper(db: Path, target_id: str, version: int, data: bytes, *, fix_checksum: bool) -> None:
    engine = create_engine(f"sqlite:///{db}")
    sha = hashlib.sha256(data).hexdigest() if fix_checksum else "0" * 64
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE obliviate_artifacts SET data = :d, sha256 = :s "
                "WHERE target_id = :t AND version = :v AND kind = 'classifier'"
            ),
            {"d": data, "s": sha, "t": target_id, "v": version},
        )
        conn.execute(text("UPDATE obliviate_meta SET value = value || '0' WHERE key='revision'"))
    engine.dispose()


def test_a_target_that_cannot_load_is_failed_and_the_others_are_enforced(env, harry):
    client, _, db = env
    response = client.post("/admin/targets", json=FRODO, headers=AUTH)
    assert wait_for_job(client, response.json()["id"], timeout=300)["status"] == "succeeded"
    frodo = response.json()["target_id"]
    frodo_probe = {"prompt": "Where does Frodo Baggins live?"}
    assert _flagged(client, frodo_probe)
    version = _target(client, frodo)["version"]

    # Artifacts that fail their checksum, then ones made with another embedder.
    _tamper(db, frodo, version, b"garbage", fix_checksum=False)
    service = client.app.state.targets
    service._loaded.clear()  # versions are immutable, so loads are cached: load afresh
    client.portal.call(service.reload)
    target = _target(client, frodo)
    assert target["status"] == "failed" and "checksum" in target["load_error"]
    assert target["active"] is False
    assert _flagged(client) and not _flagged(client, frodo_probe)  # Harry still enforced
    metrics = client.get("/metrics", headers=AUTH).text
    assert f'obliviate_target_load_failed{{target="{frodo}"}} 1.0' in metrics
    assert "obliviate_targets_enforced 1.0" in metrics
    listed = {
        t["id"]: t["status"] for t in client.get("/admin/targets", headers=AUTH).json()["data"]
    }
    assert listed == {harry: "active", frodo: "failed"}

    good = service._guard.active["Harry Potter"].classifier
    alien = replace(good, name="Frodo Baggins", embedder_fingerprint="another-embedder")
    _tamper(db, frodo, version, TargetClassifier.to_bytes(alien), fix_checksum=True)
    client.portal.call(service.reload)
    target = _target(client, frodo)
    assert target["status"] == "failed" and "embedder" in target["load_error"]
    assert _flagged(client)


def test_a_gateway_starts_with_a_target_that_cannot_load(env, harry):
    """Last: restarts the app on the same registry, with the broken Frodo target still in it."""
    client, engine, db = env
    settings = client.app.state.settings
    with TestClient(create_app(settings, engine=engine)) as again:
        assert again.get("/ready").status_code == 200
        statuses = {
            t["name"]: t["status"] for t in again.get("/admin/targets", headers=AUTH).json()["data"]
        }
        assert statuses == {"Harry Potter": "active", "Frodo Baggins": "failed"}
        assert _flagged(again)
