"""Shared fixtures: settings built in code, a fake engine, a client with the lifespan running."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings

ADMIN_TOKEN = "test-admin-token-0123456789"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _no_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings in code: the developer's OBLIVIATE_* variables never leak in."""
    for name in list(os.environ):
        if name.startswith("OBLIVIATE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server for the session (tests/postgres.py); its superuser URL."""
    from tests.postgres import PostgresUnavailable, running_postgres

    try:
        with running_postgres() as url:
            yield url
    except PostgresUnavailable as e:
        pytest.skip(f"no PostgreSQL server could be started: {e}")


@pytest.fixture
def redis_server() -> Iterator[tuple[str, object]]:
    """A real Redis server for one test (tests/redis_server.py): its URL and process."""
    from tests.redis_server import RedisUnavailable, running_redis

    try:
        with running_redis() as (url, proc):
            yield url, proc
    except RedisUnavailable as e:
        pytest.skip(f"no Redis server could be started: {e}")


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    from tests.postgres import create_database

    return create_database(postgres_server)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        model_cache_dir=tmp_path / "models",
        admin_token=ADMIN_TOKEN,
    )


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(settings, engine=fake_engine)
    with TestClient(app) as test_client:
        yield test_client
