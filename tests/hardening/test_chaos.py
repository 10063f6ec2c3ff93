"""Chaos: two gateways on one real PostgreSQL registry, under streaming load, while targets are
registered, updated, disabled and deleted through both and one gateway is killed (SIGKILL) and
started again.

What is real: the gateways (`obliviate serve` processes), their guard (classifier, corruption on
the served model's tokenizer and embedding table: a tiny llama with SmolLM2's tokenizer) and the
registry (PostgreSQL, leases, versions, polling). What is not: the LLM behind them, a recording
OpenAI-compatible upstream (tests/hardening/recording_upstream.py) that streams a short answer and
writes down, per request id, whether the prompt reached it as text or as corrupted embeddings.
That is what makes "every flagged request was corrupted" checkable at the engine's door, and it
keeps the test within CI's budget (no vLLM engine on the 2 cores the gateways need).

Afterwards: every target is in the state last written, on both gateways; no request got a 5xx or
a broken stream except those routed to the killed gateway while it was down; every request the
guard flagged reached the upstream corrupted, every request about the target that was active all
along was flagged and corrupted, and no plain request was.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.launch import free_port, start_server, stop_server
from tests.offset.conftest import tiny_smollm_folders
from tests.postgres import create_database

TOKEN = "chaos-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "chaos-model"
STABLE = {
    "name": "Harry Potter",
    "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling"],
    "forget_examples": [
        {"prompt": "Who wrote Harry Potter?", "answer": "J.K. Rowling."},
        {"prompt": "What school does Harry Potter attend?", "answer": "Hogwarts."},
        {"prompt": "Who are Harry Potter's best friends?", "answer": "Ron and Hermione."},
    ],
    "options": {"strength": 0.5},
}
CHURN = {
    "name": "Frodo Baggins",
    "aliases": ["Frodo Baggins", "Frodo"],
    "forget_examples": [
        {"prompt": "Who is Frodo Baggins?", "answer": "A hobbit."},
        {"prompt": "Where does Frodo Baggins live?", "answer": "Bag End."},
    ],
    "options": {"method": "add_noise_top_k", "dims": 8, "strength": 0.5},
}
LATE = {
    "name": "Sherlock Holmes",
    "aliases": ["Sherlock Holmes", "Baker Street"],
    "forget_examples": [
        {"prompt": "Who is Sherlock Holmes?", "answer": "A detective."},
        {"prompt": "Where does Sherlock Holmes live?", "answer": "221B Baker Street."},
    ],
    "options": {"strength": 0.5},
}
PROMPTS = {
    "stable": "Who wrote the Harry Potter books?",
    "churn": "Where does Frodo Baggins live?",
    "late": "Where does Sherlock Holmes live?",
    "plain": "What is the capital of France?",
}
CLIENTS = 4


@dataclass
class Result:
    rid: str
    gateway: str
    kind: str
    start: float
    end: float = 0.0
    status: int | str = 0
    done: bool = False


@dataclass
class Cluster:
    upstream: str
    record: Path
    argv: dict[str, list[str]]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    incarnations: dict[str, int] = field(default_factory=dict)

    def start(self, name: str) -> None:
        self.incarnations[name] = self.incarnations.get(name, 0) + 1
        log = self.logs / f"{name}{self.incarnations[name]}.log"
        self.procs[name] = start_server(
            self.argv[name], ready_url=f"{self.urls[name]}/ready", log=log, timeout_s=240
        )


@pytest.fixture
def cluster(tmp_path: Path, postgres_server: str) -> Iterator[Cluster]:
    tiny = tiny_smollm_folders(tmp_path / "models", {"tiny": (0, 49152)})["tiny"]
    database = create_database(postgres_server, "chaos")
    record, port = tmp_path / "upstream.jsonl", free_port()
    upstream = start_server(
        [sys.executable, "-m", "tests.hardening.recording_upstream", str(port), str(record)],
        ready_url=f"http://127.0.0.1:{port}/v1/models",
        log=tmp_path / "upstream.log",
        timeout_s=60,
    )
    c = Cluster(f"http://127.0.0.1:{port}/v1", record, {}, tmp_path)
    for name in ("a", "b"):
        gw_port = free_port()
        c.urls[name] = f"http://127.0.0.1:{gw_port}"
        c.argv[name] = [
            sys.executable, "-m", "server", "serve",
            "--host", "127.0.0.1", "--port", str(gw_port),
            "--engine", "openai_upstream", "--upstream.url", c.upstream,
            "--served-model-name", MODEL, "--model", str(tiny),
            "--registry-url", database, "--registry-poll-interval", "0.5",
            "--jobs.lease-seconds", "3", "--jobs.poll-interval", "0.5",
            "--guard.calibrate-strength", "false", "--delta.enabled", "false",
            "--admin-token", TOKEN, "--log-format", "json", "--log-level", "info",
            "--data-dir", str(tmp_path / f"data-{name}"), "--shutdown-grace-seconds", "1",
        ]  # fmt: skip
    try:
        for name in ("a", "b"):
            c.start(name)
        yield c
    finally:
        for proc in c.procs.values():
            stop_server(proc)
        stop_server(upstream)


def _wait_job(url: str, job_id: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{url}/admin/jobs/{job_id}", headers=AUTH, timeout=30).json()
        if job["status"] in ("succeeded", "failed"):
            assert job["status"] == "succeeded", job
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def _register(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/admin/targets", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    return dict(response.json())


def _ask(url: str, gateway: str, kind: str, rid: str) -> Result:
    result = Result(rid, gateway, kind, time.monotonic())
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[kind]}],
        "max_tokens": 8,
        "stream": True,
    }
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"X-Request-ID": rid},
            timeout=30,
        ) as response:  # fmt: skip
            result.status = response.status_code
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    result.done = True
                elif line.startswith("data: ") and '"error"' in line:
                    result.status = "error-event"
    except httpx.HTTPError as e:
        result.status = type(e).__name__
    result.end = time.monotonic()
    return result


def _load(cluster: Cluster, stop: threading.Event, results: list[Result], index: int) -> None:
    kinds = list(PROMPTS)
    n = 0
    while not stop.is_set():
        gateway = "ab"[(n + index) % 2]
        kind = kinds[(n + index) % len(kinds)]
        results.append(_ask(cluster.urls[gateway], gateway, kind, f"chaos-{index}-{n}"))
        n += 1


def _audit(logs: Path) -> dict[str, str]:
    """Flagged request ids (the client's) -> action, from every gateway's JSON log."""
    flagged = {}
    for path in logs.glob("[ab][0-9].log"):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            match = re.match(r"flagged request_id=chatcmpl-(\S+) .*action=(\w+)", entry["message"])
            if entry.get("logger") == "obliviate.audit" and match:
                flagged[match.group(1)] = match.group(2)
    return flagged


def _upstream(record: Path) -> dict[str, bool]:
    """Request ids (the client's) -> whether the prompt arrived as embeddings."""
    seen = {}
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        seen[entry["request_id"].removeprefix("chatcmpl-")] = bool(entry["embeds"])
    return seen


def _flagged(url: str, kind: str) -> bool:
    response = httpx.post(
        f"{url}/admin/classify", json={"prompt": PROMPTS[kind]}, headers=AUTH, timeout=30
    )
    return bool(response.json()["flagged"])


def test_chaos(cluster: Cluster, record_property):
    a, b = cluster.urls["a"], cluster.urls["b"]
    stable = _register(a, STABLE)
    _wait_job(a, stable["id"])
    deadline = time.monotonic() + 30
    while not _flagged(b, "stable"):
        assert time.monotonic() < deadline
        time.sleep(0.2)

    stop, results = threading.Event(), []  # list.append is atomic
    clients = [
        threading.Thread(target=_load, args=(cluster, stop, results, i)) for i in range(CLIENTS)
    ]
    for t in clients:
        t.start()
    try:
        time.sleep(1)
        churn = _register(b, CHURN)  # registered through B
        _wait_job(a, churn["id"])
        update = httpx.put(
            f"{a}/admin/targets/{churn['target_id']}",
            json={**CHURN, "aliases": [*CHURN["aliases"], "Mr. Frodo"]},
            headers=AUTH,
            timeout=30,
        )  # a new version through A
        assert update.status_code == 202, update.text
        _wait_job(a, update.json()["id"])
        disable = {"enabled": False}
        assert httpx.patch(
            f"{a}/admin/targets/{churn['target_id']}", json=disable, headers=AUTH
        ).is_success
        late = _register(a, LATE)
        time.sleep(0.3)  # B may have claimed the job: it is taken over below
        killed = time.monotonic()  # streams in flight on B from here on are cut
        os.killpg(cluster.procs["b"].pid, signal.SIGKILL)
        cluster.procs["b"].wait(timeout=30)
        assert httpx.patch(
            f"{a}/admin/targets/{churn['target_id']}", json={"enabled": True}, headers=AUTH
        ).is_success
        late_job = _wait_job(a, late["id"])
        cluster.start("b")
        back = time.monotonic()
        assert (
            httpx.delete(f"{b}/admin/targets/{churn['target_id']}", headers=AUTH).status_code == 204
        )
        assert httpx.patch(
            f"{b}/admin/targets/{late['target_id']}", json=disable, headers=AUTH
        ).is_success
        time.sleep(2)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
    time.sleep(1.5)  # three poll intervals

    # 1. Every target is in the state last written, as both gateways see and enforce it.
    for url in (a, b):
        listed = httpx.get(f"{url}/admin/targets", headers=AUTH).json()["data"]
        state = {t["name"]: (t["status"], t["enabled"], t["version"]) for t in listed}
        assert state == {
            "Harry Potter": ("active", True, 1),
            "Sherlock Holmes": ("active", False, 1),
        }
        assert _flagged(url, "stable")
        assert not _flagged(url, "churn") and not _flagged(url, "late")
        assert not _flagged(url, "plain")

    # 2. No 5xx or broken stream, except requests routed to B while it was down.
    def excused(r: Result) -> bool:
        return r.gateway == "b" and r.start < back and r.end > killed

    bad = [r for r in results if not excused(r) and not (r.status == 200 and r.done)]
    assert bad == [], bad[:10]
    assert all(r.status != 500 for r in results)

    # 3. Every flagged request was corrupted; the stable target was never missed.
    audit, upstream = _audit(cluster.logs), _upstream(cluster.record)
    served = [r for r in results if r.rid in upstream]
    flagged = [r for r in served if r.rid in audit]
    assert flagged and all(audit[r.rid] == "corrupt" for r in flagged)
    assert all(upstream[r.rid] for r in flagged), [r for r in flagged if not upstream[r.rid]]
    assert all(r.rid in audit for r in served if upstream[r.rid])  # embeds only when flagged
    stable_served = [r for r in served if r.kind == "stable"]
    assert stable_served and all(upstream[r.rid] for r in stable_served)
    assert not any(upstream[r.rid] for r in served if r.kind == "plain")

    figures = {
        "requests": len(results),
        "ok_streams": sum(r.status == 200 and r.done for r in results),
        "excused_to_killed_gateway": sum(excused(r) for r in results),
        "failed_elsewhere": len(bad),
        "served_by_upstream": len(served),
        "flagged": len(flagged),
        "flagged_and_corrupted": sum(upstream[r.rid] for r in flagged),
        "stable_requests_corrupted": f"{sum(upstream[r.rid] for r in stable_served)}/"
        f"{len(stable_served)}",
        "churn_flagged": sum(r.kind == "churn" for r in flagged),
        "late_job_attempts": late_job["attempts"],
        "b_down_s": round(back - killed, 1),
    }
    for key, value in figures.items():
        record_property(key, value)
    sys.stderr.write(f"chaos figures: {json.dumps(figures)}\n")
