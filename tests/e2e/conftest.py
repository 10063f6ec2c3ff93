"""One real vLLM engine per session behind the gateway, plus vLLM's own server to compare with.

The gateway runs as `obliviate serve` (a real uvicorn process) on the packaged default model;
vLLM's api_server runs on the same folder with the same settings.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.servers import (
    MODEL_NAME,
    engine_env,
    free_port,
    gateway_argv,
    running,
    vllm_server_argv,
)
from tests.e2e.targets import AUTH, TARGET, register


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@dataclass(frozen=True)
class Server:
    url: str  # base URL, no /v1
    data_dir: Path | None = None

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def model_path() -> Path:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: run `make test`, which installs it")
    from server.modelstore import resolve_model

    return resolve_model(None, auto_pull=True)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def gateway(
    model_path: Path, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """`obliviate serve` on the real vLLM engine (the session's one gateway engine)."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("gateway-data")
    argv = gateway_argv(port, "--model", str(model_path), "--data-dir", str(data_dir))
    env = engine_env()
    with running(
        argv, ready_url=f"http://127.0.0.1:{port}/ready", log=logs_dir / "gateway.log", env=env
    ):
        yield Server(f"http://127.0.0.1:{port}", data_dir)


@pytest.fixture(scope="session")
def vllm_server(model_path: Path, logs_dir: Path) -> Iterator[Server]:
    """vLLM's own OpenAI server on the same model: the reference and the upstream."""
    port = free_port()
    argv = vllm_server_argv(model_path, port)
    with running(argv, ready_url=f"http://127.0.0.1:{port}/v1/models", log=logs_dir / "vllm.log"):
        yield Server(f"http://127.0.0.1:{port}")


@pytest.fixture(scope="session")
def upstream_gateway(vllm_server: Server, logs_dir: Path) -> Iterator[Server]:
    """`obliviate serve --engine openai_upstream` in front of vLLM's server."""
    port = free_port()
    argv = gateway_argv(
        port, "--engine", "openai_upstream", "--upstream.url", f"{vllm_server.url}/v1"
    )
    with running(argv, ready_url=f"http://127.0.0.1:{port}/ready", log=logs_dir / "upstream.log"):
        yield Server(f"http://127.0.0.1:{port}")


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return gateway.client()


@pytest.fixture(scope="session")
def hp_registered(gateway: Server) -> Iterator[dict[str, Any]]:
    """The Harry Potter target (tests/e2e/targets.py) registered once on the session's gateway,
    strength search included (about a minute); deleted at the end."""
    record = register(gateway.url, TARGET)
    yield record
    httpx.delete(f"{gateway.url}/admin/targets/{record['id']}", headers=AUTH)


@pytest.fixture(scope="module")
def hp_target(gateway: Server, hp_registered: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The shared Harry Potter target, enabled for the module that asks for it and disabled
    after it, so that other modules see a gateway with no active target."""
    url = f"{gateway.url}/admin/targets/{hp_registered['id']}"
    assert httpx.patch(url, json={"enabled": True}, headers=AUTH).status_code == 200
    yield hp_registered
    httpx.patch(url, json={"enabled": False}, headers=AUTH)


__all__ = ["MODEL_NAME", "Server"]
