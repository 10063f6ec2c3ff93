"""Fault: the registry database goes away under a running gateway (real PostgreSQL, stopped
with `pg_ctl stop -m immediate`). Serving goes on with the targets already loaded; the admin
API answers 503 `registry_unavailable` saying why it cannot write."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.postgres import PostgresUnavailable, create_database, find_pg_bin, running_postgres
from tests.server.test_admin_api import AUTH, HARRY, wait_for_job

FORGET = "Who are Harry Potter's best friends at Hogwarts?"
PLAIN = "How do volcanoes form?"


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    try:
        with running_postgres() as url:
            yield url
    except PostgresUnavailable as e:
        pytest.skip(f"no PostgreSQL server here: {e}")


def _stop_server(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    bindir = find_pg_bin()
    assert bindir is not None
    subprocess.run(
        [str(bindir / "pg_ctl"), "-D", str(row[0]), "-m", "immediate", "-w", "stop"],
        user="postgres" if os.geteuid() == 0 else None,
        check=True,
        capture_output=True,
        timeout=60,
    )


def chat(content: str) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}]}


def test_serving_continues_and_admin_says_why_it_cannot_write(
    postgres: str, tmp_path_factory: pytest.TempPathFactory
):
    root = tmp_path_factory.mktemp("registry-down")
    settings = Settings(
        data_dir=root / "data",
        registry_url=create_database(postgres),
        admin_token=ADMIN_TOKEN,
    )
    engine = FakeEngine()
    with TestClient(create_app(settings, engine=engine)) as client:
        job = client.post("/admin/targets", json=HARRY, headers=AUTH).json()
        assert wait_for_job(client, job["id"], timeout=600)["status"] == "succeeded"
        flagged_before = client.post("/v1/chat/completions", json=chat(FORGET))
        # No local model copy: a flagged prompt is refused (503), an unflagged one served.
        assert flagged_before.status_code == 503
        assert "protected topic" in flagged_before.json()["error"]["message"]

        _stop_server(postgres)

        # Serving: the last good targets still apply, other traffic is served.
        still = client.post("/v1/chat/completions", json=chat(FORGET))
        assert still.status_code == 503 and "protected topic" in still.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json=chat(PLAIN)).status_code == 200
        dry = client.post("/admin/classify", json={"prompt": FORGET}, headers=AUTH)
        assert dry.status_code == 200 and dry.json()["flagged"] is True
        # Admin writes (and reads) say why they cannot be done.
        new = {**HARRY, "name": "Someone else", "aliases": ["Someone Else"]}
        for response in (
            client.post("/admin/targets", json=new, headers=AUTH),
            client.patch(
                f"/admin/targets/{job['target_id']}", json={"enabled": False}, headers=AUTH
            ),
            client.get("/admin/targets", headers=AUTH),
        ):
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["type"] == "service_unavailable"
            assert error["code"] == "registry_unavailable"
            assert "registry" in error["message"] and "cannot" in error["message"]
        assert client.get("/health").status_code == 200
