"""Fault: the gateway process is killed with SIGKILL while a registration job runs.

Afterwards the registry is intact (SQLite integrity_check) and holds the old state (target not
active, job unfinished) or the new one (target active, job succeeded), never a mix; started
again on the same data dir, the gateway re-runs the interrupted job to the end.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from server.registry import Registry
from tests.conftest import ADMIN_TOKEN
from tests.e2e.servers import free_port
from tests.server.test_admin_api import HARRY

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@contextmanager
def gateway(
    data_dir: Path, log: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A fake-engine gateway process (tests/hardening/fake_gateway.py; 3 s job leases)."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.hardening.fake_gateway", str(port), str(data_dir)]
    proc = subprocess.Popen(
        [*argv, ADMIN_TOKEN, *extra],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the gateway did not start"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _job(url: str, job_id: str) -> dict:
    return dict(httpx.get(f"{url}/admin/jobs/{job_id}", headers=AUTH, timeout=30).json())


def test_sigkill_mid_registration_leaves_old_or_new_state_and_the_job_reruns(tmp_path: Path):
    data_dir, log = tmp_path / "data", tmp_path / "gateway.log"
    with gateway(data_dir, log) as (proc, url):
        created = httpx.post(f"{url}/admin/targets", json=HARRY, headers=AUTH, timeout=30)
        assert created.status_code == 202, created.text
        job_id, target_id = created.json()["id"], created.json()["target_id"]
        deadline = time.monotonic() + 300
        while _job(url, job_id)["status"] == "queued":  # the worker warms up first
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-job: training the classifier
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL

    db = data_dir / "registry.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    registry = Registry(f"sqlite:///{db}")
    try:
        target, job = registry.get_target(target_id), registry.get_job(job_id)
        assert target is not None and job is not None
        if job.status == "succeeded":  # the new state, whole
            assert target.status == "active" and registry.load_artifacts(target_id, target.version)
        else:  # the old state: nothing half-activated
            assert job.status in ("queued", "running")
            assert target.status in ("pending", "training")
            assert [j.id for j in registry.unfinished_jobs()] == [job_id]
    finally:
        registry.close()

    with gateway(data_dir, log) as (_, url):
        deadline = time.monotonic() + 300
        while (job_now := _job(url, job_id))["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job_now
            time.sleep(0.2)
        assert job_now["status"] == "succeeded", job_now
        target_now = httpx.get(f"{url}/admin/targets/{target_id}", headers=AUTH).json()
        assert target_now["status"] == "active" and target_now["active"] is True
        listed = httpx.get(f"{url}/admin/targets", headers=AUTH).json()["data"]
        assert [t["id"] for t in listed] == [target_id]  # re-run, not duplicated
        dry = httpx.post(
            f"{url}/admin/classify", json={"prompt": "Who wrote Harry Potter?"}, headers=AUTH
        )
        assert dry.json()["flagged"] is True
