"""Shortened load run (bench/load.py) on the real vLLM engine: 16 streaming clients for 10 s
against a gateway with a low queue limit, in front of the session's vLLM server. Only 429s are
refused, each with Retry-After, and the gateway's memory stays bounded."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Server
from tests.e2e.servers import free_port, gateway_argv, running

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from load import run_load  # noqa: E402


@pytest.fixture(scope="module")
def limited_gateway(
    vllm_server: Server, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    port = free_port()
    argv = gateway_argv(
        port,
        "--engine", "openai_upstream",
        "--upstream.url", f"{vllm_server.url}/v1",
        "--data-dir", str(tmp_path_factory.mktemp("limited")),
        "--limits.max-concurrent-requests", "4",
        "--limits.max-queued-requests", "4",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running(argv, ready_url=f"{url}/ready", log=logs_dir / "limited.log") as proc:
        yield url, proc.pid


def test_short_load_run_only_429s_with_retry_after_and_bounded_memory(
    limited_gateway: tuple[str, int],
):
    url, pid = limited_gateway
    report = run_load(url, pid, clients=16, duration_s=10, tokens=16)
    print({k: v for k, v in report.items() if k != "timeline"})  # noqa: T201
    assert report["errors"] == 0, report["error_samples"]
    assert report["requests_completed"] > 0
    assert report["responses_429"] > 0  # 16 clients > 4 running + 4 queued
    assert report["responses_429_without_retry_after"] == 0
    rss = report["rss_mib"]
    assert rss["peak"] - rss["start"] < 300, rss  # no pile-up of requests in memory
    # ... over samples taken all through the 10 s (one a second), not only at its two ends.
    assert len(report["timeline"]) >= 10, report["timeline"]
