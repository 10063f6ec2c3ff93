"""A light app for API-surface tests: the fake engine, no classifier, one per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings


@pytest.fixture(scope="module")
def light_engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


@pytest.fixture(scope="module")
def light_client(
    tmp_path_factory: pytest.TempPathFactory, light_engine: FakeEngine
) -> Iterator[TestClient]:
    """The gateway on the fake engine with the guard off (no embedder to load: fast)."""
    root = tmp_path_factory.mktemp("light")
    settings = Settings(
        data_dir=root / "data",
        model_cache_dir=root / "models",
        admin_enabled=False,
        guard={"enabled": False},  # type: ignore[arg-type]
    )
    with TestClient(create_app(settings, engine=light_engine)) as client:
        yield client
