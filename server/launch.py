"""Run a server as a subprocess on 127.0.0.1 until it answers, and stop it (with its children).

Used by `obliviate eval` (gateways per evaluated model), the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_env() -> dict[str, str]:
    """This process's environment plus what vLLM needs offline on a CPU (caller's values win)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return env


def start_server(
    argv: Sequence[str],
    *,
    ready_url: str,
    log: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 420.0,
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own process group, output to `log`, and wait for `ready_url` to
    answer 200. RuntimeError if it exits first, TimeoutError if it is not ready in time (it is
    stopped in both cases)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or engine_env(),
            start_new_session=True,
        )
    try:
        _wait_ready(proc, ready_url, log, timeout_s)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s; log: {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the whole process group (vLLM's engine core included), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextmanager
def running(
    argv: Sequence[str],
    *,
    ready_url: str,
    log: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 420.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """`start_server` for the length of a with-block; always stopped at its end."""
    proc = start_server(argv, ready_url=ready_url, log=log, env=env, timeout_s=timeout_s)
    try:
        yield proc
    finally:
        stop_server(proc)
