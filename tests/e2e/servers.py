"""Start real servers on 127.0.0.1 for end-to-end tests and benchmarks, and stop them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

MODEL_NAME = "SmolLM2-135M-Instruct"
ADMIN_TOKEN = "e2e-admin-token-0123456789abcdef"
# Same engine settings on both sides of every comparison. Tests run in float32 so that δ mode can
# be compared token for token with the SNAP model run by transformers (bf16 kernels differ by up
# to 0.4 in logprob); benchmarks pass bfloat16, the fastest dtype here.
MAX_MODEL_LEN = 2048
DTYPE = "float32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return env


@contextmanager
def running(
    argv: Sequence[str],
    *,
    ready_url: str,
    log: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 420.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` until `ready_url` answers 200; always stop it (SIGINT, then SIGKILL)."""
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
            yield proc
        finally:
            _stop(proc)


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def vllm_server_argv(model_path: Path, port: int, *, dtype: str = DTYPE) -> list[str]:
    """vLLM's own OpenAI server on the same model and settings as the gateway's engine."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", MODEL_NAME,
        "--dtype", dtype,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--enable-prompt-embeds",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--disable-log-stats",
    ]  # fmt: skip


def gateway_argv(port: int, *extra: str, dtype: str = DTYPE) -> list[str]:
    """`obliviate serve` on 127.0.0.1."""
    return [
        sys.executable, "-m", "server", "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", MODEL_NAME,
        "--vllm.dtype", dtype,
        "--vllm.max-model-len", str(MAX_MODEL_LEN),
        "--log-level", "warning",
        "--admin-token", ADMIN_TOKEN,
        *extra,
    ]  # fmt: skip
