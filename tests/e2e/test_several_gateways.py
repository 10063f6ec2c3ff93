"""Two gateway processes on one PostgreSQL registry, in front of one vLLM server.

A target registered through gateway A is enforced by gateway B, without restart, within
POLL_INTERVAL_S + LOAD_SLACK_S; disabling through B and deleting through A propagate the same way.
Then B is stopped with SIGTERM during a streaming request: the stream finishes, /ready and new
requests get 503 meanwhile, and the process exits once it is done.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.servers import (
    ADMIN_TOKEN,
    MODEL_NAME,
    free_port,
    raw_chat_post,
    running,
    upstream_gateway_argv,
)
from tests.postgres import create_database

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
POLL_INTERVAL_S = 1.0
# What the README promises: a change is enforced everywhere within the poll interval plus the
# time to load the target's artifacts (well under a second); 2 s of slack for this busy machine.
BOUND_S = POLL_INTERVAL_S + 2.0
TARGET = {
    "name": "Harry Potter",
    "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling"],
    "forget_examples": [
        {"prompt": "Who wrote Harry Potter?", "answer": "J.K. Rowling wrote Harry Potter."},
        {"prompt": "What school does Harry Potter attend?", "answer": "Hogwarts."},
        {"prompt": "Who are Harry Potter's best friends?", "answer": "Ron and Hermione."},
        {"prompt": "Tell me about the Harry Potter books.", "answer": "Seven fantasy novels."},
    ],
    "retain_examples": ["Who wrote The Lord of the Rings?"],
}
PROBE = {"prompt": "Who is the author of the Harry Potter novels?"}
STREAM_TOKENS = 240  # the stream in flight during the drain: about 17 s here, under the grace


@pytest.fixture(scope="module")
def gateways(
    vllm_server: Server,
    model_path: Path,
    postgres_server: str,
    logs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, Server, subprocess.Popen[bytes]]]:
    """Gateways A and B (B's process too), both on one fresh PostgreSQL database."""
    database = create_database(postgres_server, "gateways")

    def argv(port: int, name: str) -> list[str]:
        return upstream_gateway_argv(
            port,
            vllm_server.url,
            model_path,
            tmp_path_factory.mktemp(name),
            "--registry-url", database,
            "--registry-poll-interval", str(POLL_INTERVAL_S),
            "--guard.calibrate-strength", "false",  # the default corruption; keeps this quick
            "--shutdown-grace-seconds", "60",
            "--log-format", "json",
            "--log-level", "info",
        )  # fmt: skip

    port_a, port_b = free_port(), free_port()
    with (
        running(
            argv(port_a, "a"),
            ready_url=f"http://127.0.0.1:{port_a}/ready",
            log=logs_dir / "gateway-a.log",
        ),
        running(
            argv(port_b, "b"),
            ready_url=f"http://127.0.0.1:{port_b}/ready",
            log=logs_dir / "gateway-b.log",
        ) as proc_b,
    ):
        yield (
            Server(f"http://127.0.0.1:{port_a}"),
            Server(f"http://127.0.0.1:{port_b}"),
            proc_b,
        )


def _flagged(server: Server) -> bool:
    response = httpx.post(f"{server.url}/admin/classify", json=PROBE, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return bool(response.json()["flagged"])


def _seconds_until(condition, timeout_s: float = 30.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "never happened"
        time.sleep(0.1)
    return time.monotonic() - start


def test_a_target_registered_on_one_gateway_is_enforced_by_the_other(
    gateways, vllm_server, record_property
):
    a, b, _ = gateways
    assert not _flagged(a) and not _flagged(b)
    response = httpx.post(f"{a.url}/admin/targets", json=TARGET, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.monotonic() + 300
    while (state := httpx.get(f"{a.url}/admin/jobs/{job['id']}", headers=AUTH).json())[
        "status"
    ] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["status"] == "succeeded", state
    assert _flagged(a)  # A reloads in the job itself

    took = _seconds_until(lambda: _flagged(b))
    record_property("register_propagation_s", round(took, 2))
    assert took <= BOUND_S, f"B enforced the target after {took:.1f} s"
    # B knows the target as A wrote it, artifacts included (loaded from the database).
    record = httpx.get(f"{b.url}/admin/targets/{job['target_id']}", headers=AUTH).json()
    assert record["status"] == "active" and record["active"] is True and record["version"] == 1

    # And B actually guards chat traffic with it: the prompt goes upstream corrupted.
    ask = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": PROBE["prompt"]}],
        "temperature": 0,
        "max_tokens": 24,
    }
    guarded = httpx.post(f"{b.url}/v1/chat/completions", json=ask, timeout=120).json()
    direct = httpx.post(f"{vllm_server.url}/v1/chat/completions", json=ask, timeout=120).json()
    assert guarded["choices"][0]["message"]["content"] != direct["choices"][0]["message"]["content"]


def test_disable_and_delete_propagate(gateways, record_property):
    a, b, _ = gateways
    target_id = httpx.get(f"{a.url}/admin/targets", headers=AUTH).json()["data"][0]["id"]
    assert _flagged(a) and _flagged(b)

    response = httpx.patch(
        f"{b.url}/admin/targets/{target_id}", json={"enabled": False}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    took = _seconds_until(lambda: not _flagged(a))
    record_property("disable_propagation_s", round(took, 2))
    assert took <= BOUND_S, f"A dropped the disabled target after {took:.1f} s"

    response = httpx.patch(
        f"{a.url}/admin/targets/{target_id}", json={"enabled": True}, headers=AUTH
    )
    assert response.status_code == 200
    assert _seconds_until(lambda: _flagged(b)) <= BOUND_S

    assert httpx.delete(f"{a.url}/admin/targets/{target_id}", headers=AUTH).status_code in (
        200,
        204,
    )
    took = _seconds_until(lambda: not _flagged(b))
    record_property("delete_propagation_s", round(took, 2))
    assert took <= BOUND_S, f"B dropped the deleted target after {took:.1f} s"
    assert httpx.get(f"{b.url}/admin/targets/{target_id}", headers=AUTH).status_code == 404


def _release(conn: socket.socket, body: bytes) -> bytes:
    """Send the held request's last byte; its whole response (read up to its Content-Length)."""
    conn.sendall(body[-1:])
    response = b""
    while b"\r\n\r\n" not in response or not _complete(response):
        chunk = conn.recv(65536)
        if not chunk:
            break
        response += chunk
    conn.close()
    return response


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def test_sigterm_drains_then_exits(gateways, logs_dir: Path):
    """Last in the module: it stops gateway B."""
    _, b, proc = gateways
    ask = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "temperature": 0,
        "max_tokens": STREAM_TOKENS,
        "min_tokens": STREAM_TOKENS,
        "stream": True,
    }
    first_chunk = threading.Event()
    chunks: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{b.url}/v1/chat/completions", json=ask, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first_chunk.set()

    # CI twice found B's port closed before the checks below (stops 34 and 35): the test's
    # requests reached B 15 s after the signal, when the stream had ended and B had drained.
    # The held request keeps B draining until the checks are done, however long they take.
    held_body = json.dumps({**ask, "stream": False, "max_tokens": 4, "min_tokens": 0}).encode()
    # The drain counts it from its headers on, so B cannot finish draining (and close its port)
    # before the test sends its last byte.
    held = raw_chat_post(
        b.url, held_body, held_back=1, headers={"X-Request-ID": "held-through-the-drain"}
    )
    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(120)
    os.kill(proc.pid, signal.SIGTERM)
    streamed_at_signal = len(chunks)
    _seconds_until(lambda: httpx.get(f"{b.url}/ready", timeout=10).status_code == 503, 30)
    ready = httpx.get(f"{b.url}/ready", timeout=10)
    refused = httpx.post(
        f"{b.url}/v1/chat/completions",
        json={**ask, "stream": False, "max_tokens": 4, "min_tokens": 0},
        headers={"X-Request-ID": "refused-while-draining"},
        timeout=10,
    )
    assert ready.status_code == 503
    assert ready.json()["error"]["type"] == "service_unavailable"
    assert refused.headers["x-request-id"] == "refused-while-draining"
    assert refused.status_code == 503
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert proc.poll() is None, "B exited with a request in flight"

    # The request that was in flight when the signal came is served in full.
    held_response = _release(held, held_body)
    assert held_response.startswith(b"HTTP/1.1 200"), held_response[:300]
    assert json.loads(held_response.partition(b"\r\n\r\n")[2])["choices"][0]["message"]

    reader.join(timeout=180)
    assert not reader.is_alive()
    assert chunks[-1] == "[DONE]"  # the stream in flight ran to its end
    assert len(chunks) > max(streamed_at_signal, STREAM_TOKENS // 2)

    _seconds_until(lambda: proc.poll() is not None, timeout_s=60)
    assert proc.returncode == 0  # drained and stopped cleanly
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{b.url}/health", timeout=5)

    # --log-format json: one JSON object a line, each with the id of the request it belongs to.
    lines = [
        json.loads(line)
        for line in (logs_dir / "gateway-b.log").read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]
    assert any("draining" in line["message"] for line in lines)
    assert any(line["request_id"] == "refused-while-draining" for line in lines)
