"""Fault: the upstream engine (engine=openai_upstream) is killed with SIGKILL mid-stream.

The client gets an OpenAI error object inside the SSE stream and a clean close ([DONE]); once
the upstream is back on its port, the same gateway serves again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import GuardSettings, Settings, UpstreamSettings
from tests.e2e.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _start_stub(port: int, log: Path, mode: str = "") -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hardening.upstream_stub", str(port)],
        cwd=ROOT,
        env={**os.environ, "STUB_MODE": mode},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError("the stub upstream did not start")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    port = free_port()
    procs = [_start_stub(port, tmp_path / "stub.log")]
    yield port, procs
    for proc in procs:
        _kill(proc)


def _events(body: str) -> list[str]:
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


def test_upstream_killed_mid_stream(
    upstream: tuple[int, list[subprocess.Popen[bytes]]], tmp_path: Path
):
    port, procs = upstream
    settings = Settings(
        data_dir=tmp_path / "data",
        engine="openai_upstream",
        upstream=UpstreamSettings(url=f"http://127.0.0.1:{port}/v1", read_timeout_s=30),
        guard=GuardSettings(enabled=False),
        admin_enabled=False,
    )
    request = {
        "model": "stub-model",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": True,
    }
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the gateway never saw its upstream"
            time.sleep(0.2)

        killer = threading.Timer(1.0, _kill, args=(procs[0],))
        killer.start()
        started = time.monotonic()
        response = client.post("/v1/chat/completions", json=request)
        elapsed = time.monotonic() - started
        killer.join()
        assert response.status_code == 200  # the stream had started before the kill
        events = _events(response.text)
        assert events[-1] == "[DONE]", events[-3:]  # a clean close, not a hang
        assert elapsed < 20
        chunks = [json.loads(e) for e in events[:-1]]
        words = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
        assert 1 <= len([w for w in words if w]) < 40  # some words came, then the kill
        error = chunks[-1]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "upstream_error"
        assert "upstream" in error["message"].lower()

        # The upstream comes back on its port: the same gateway serves again.
        procs.append(_start_stub(port, tmp_path / "stub.log"))
        again = client.post(
            "/v1/chat/completions", json={**request, "stream": False, "max_tokens": 5}
        )
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"].split() == [
            "w0", "w1", "w2", "w3", "w4"
        ]  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "says"), [("cut", "before [DONE]"), ("garbage", "malformed stream chunk")]
)
def test_a_cut_or_malformed_upstream_stream_ends_with_an_error_event(
    mode: str, says: str, tmp_path: Path
):
    port = free_port()
    stub = _start_stub(port, tmp_path / "stub.log", mode)
    try:
        settings = Settings(
            data_dir=tmp_path / "data",
            engine="openai_upstream",
            upstream=UpstreamSettings(url=f"http://127.0.0.1:{port}/v1"),
            guard=GuardSettings(enabled=False),
            admin_enabled=False,
        )
        with TestClient(create_app(settings)) as client:
            deadline = time.monotonic() + 60
            while client.get("/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            body = {"model": "stub-model", "messages": [{"role": "user", "content": "Hi"}]}
            streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
            events = _events(streamed.text)
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["type"] == "upstream_error" and says in error["message"]
            whole = client.post("/v1/chat/completions", json=body)
            assert whole.status_code == 502, whole.text
            assert says in whole.json()["error"]["message"]
    finally:
        _kill(stub)
