"""δ model folders live in the registry: a δ target registered on gateway A is enforced by
gateway B, which shares only the database with it (its own data dir, the folders A registered
from deleted before B loads them). Real classifier and SQLite registry, fake engine."""

from __future__ import annotations

import hashlib
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.offset.conftest import tiny_smollm_folders
from tests.server.test_admin_api import AUTH, HARRY, wait_for_job


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_a_delta_target_registered_on_one_gateway_is_enforced_by_another(tmp_path: Path):
    models = tiny_smollm_folders(
        tmp_path / "operator", {"base": (0, 49152), "unlearned": (1, 49152)}
    )
    originals = {name: _digests(folder) for name, folder in models.items()}
    url = f"sqlite:///{tmp_path / 'shared' / 'registry.db'}"

    def settings(name: str) -> Settings:
        return Settings(
            data_dir=tmp_path / name,
            model_cache_dir=tmp_path / "m",
            admin_token=ADMIN_TOKEN,
            registry_url=url,
            registry_poll_interval=0.2,
            jobs={"poll_interval": 0.2},
        )

    engine_b = FakeEngine()
    with ExitStack() as stack:
        a = stack.enter_context(TestClient(create_app(settings("a"), engine=FakeEngine())))
        options = {
            "small_base": str(models["base"]),
            "unlearned_model": str(models["unlearned"]),
            "alpha": 0.5,
        }
        response = a.post(
            "/admin/targets", json={**HARRY, "mode": "delta", "options": options}, headers=AUTH
        )
        assert response.status_code == 202, response.text
        assert wait_for_job(a, response.json()["id"], timeout=300)["status"] == "succeeded"
        shutil.rmtree(tmp_path / "operator")  # nothing of it is left on any disk

        b = stack.enter_context(TestClient(create_app(settings("b"), engine=engine_b)))
        body = {
            "model": "fake-model",
            "messages": [{"role": "user", "content": "Who wrote the Harry Potter books?"}],
        }
        deadline = time.monotonic() + 60
        while True:
            assert b.post("/v1/chat/completions", json=body).status_code == 200
            if engine_b.history[-1].offsets:
                break
            assert time.monotonic() < deadline, "B never enforced the δ target"
            time.sleep(0.2)
        (spec,) = engine_b.history[-1].offsets
        assert spec.alpha == 0.5
        cache = (tmp_path / "b" / "offsets" / "cache").resolve()
        for name, path in (("unlearned", spec.unlearned), ("base", spec.base)):
            folder = Path(path)
            assert folder.parent == cache  # fetched into B's own cache
            assert _digests(folder) == originals[name]  # byte for byte what A registered from
        target = b.get("/admin/targets", headers=AUTH).json()["data"][0]
        assert target["status"] == "active" and target["load_error"] is None
        plain = {**body, "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
        assert b.post("/v1/chat/completions", json=plain).status_code == 200
        assert engine_b.history[-1].offsets == ()
