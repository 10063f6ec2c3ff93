"""Job leases on a real PostgreSQL: two gateway processes share one registry; the one running a
registration job is killed with SIGKILL; the other takes the job over once its lease expires and
finishes it exactly once (one version, one set of artifacts, attempt 2, by the survivor)."""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import psycopg

from server.registry import Registry
from tests.hardening.test_kill_during_registration import AUTH, _job, gateway
from tests.server.test_admin_api import HARRY

LEASE_S = 3.0


def test_a_job_whose_replica_dies_is_finished_once_by_another(tmp_path: Path, postgres_url: str):
    extra = ("--registry-url", postgres_url, "--lease-seconds", str(LEASE_S))
    with ExitStack() as stack:
        procs, urls = {}, {}
        for name in ("a", "b"):
            proc, url = stack.enter_context(
                gateway(tmp_path / name, tmp_path / f"{name}.log", *extra)
            )
            procs[name], urls[name] = proc, url
        created = httpx.post(f"{urls['a']}/admin/targets", json=HARRY, headers=AUTH, timeout=30)
        assert created.status_code == 202, created.text
        job_id, target_id = created.json()["id"], created.json()["target_id"]

        deadline = time.monotonic() + 300
        while (job := _job(urls["a"], job_id))["status"] == "queued":
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["status"] == "running" and job["attempts"] == 1, job
        runner = next(n for n, p in procs.items() if job["owner"].split(":")[1] == str(p.pid))
        survivor = "b" if runner == "a" else "a"
        os.killpg(procs[runner].pid, signal.SIGKILL)  # mid-job, holding the lease
        procs[runner].wait(timeout=30)
        killed_at = time.monotonic()

        while (done := _job(urls[survivor], job_id))["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, done
            time.sleep(0.2)
        assert done["status"] == "succeeded", done
        assert time.monotonic() - killed_at >= LEASE_S - 0.5  # not before the lease expired
        assert done["attempts"] == 2
        assert done["owner"].split(":")[1] == str(procs[survivor].pid)
        target = httpx.get(f"{urls[survivor]}/admin/targets/{target_id}", headers=AUTH).json()
        assert (target["status"], target["version"], target["active"]) == ("active", 1, True)
        dry = httpx.post(
            f"{urls[survivor]}/admin/classify", json={"prompt": "Who wrote Harry Potter?"},
            headers=AUTH,
        )  # fmt: skip
        assert dry.json()["flagged"] is True

    # Exactly once: one version, one set of artifacts, and nothing left to claim.
    with psycopg.connect(postgres_url) as conn:
        kinds = conn.execute(
            "SELECT version, kind FROM obliviate_artifacts WHERE target_id = %s", (target_id,)
        ).fetchall()
        versions = conn.execute(
            "SELECT version, status FROM obliviate_target_versions WHERE target_id = %s",
            (target_id,),
        ).fetchall()
    assert sorted(kinds) == [(1, "classifier"), (1, "corruption")]
    assert versions == [(1, "ready")]
    registry = Registry(postgres_url)
    try:
        assert registry.claim_job("late-replica", 30) is None
    finally:
        registry.close()
