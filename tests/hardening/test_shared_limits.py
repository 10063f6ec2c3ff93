"""Per-key rate limits across replicas: two gateways on one real Redis server (redis-server,
started by the test) enforce one budget together; in process, each would allow the full rate."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import GuardSettings, LimitsSettings, Settings
from server.shared_limits import RedisLimiter
from tests.hardening.test_limits import _envelope, chat

KEY = "sk-shared-key-0123456789"
OTHER = "sk-other-key-0123456789"
RATE = 6


def _gateway(tmp_path: Path, name: str, **limits: object) -> TestClient:
    settings = Settings(
        data_dir=tmp_path / name,
        model_cache_dir=tmp_path / "models",
        admin_enabled=False,
        guard=GuardSettings(enabled=False),
        metrics={"public": True},
        limits=LimitsSettings(api_keys=[KEY, OTHER], requests_per_minute=RATE, **limits),  # type: ignore[arg-type]
    )
    return TestClient(create_app(settings, engine=FakeEngine()))


def _ask(client: TestClient, key: str = KEY) -> int:
    response = client.post(
        "/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"}
    )
    if response.status_code == 429:
        error = _envelope(response, 429)
        assert error["code"] == "rate_limit_exceeded"
        assert int(response.headers["retry-after"]) >= 1
    return response.status_code


def test_two_gateways_share_one_budget_in_redis(tmp_path: Path, redis_server):
    url, _ = redis_server
    with ExitStack() as stack:
        a = stack.enter_context(_gateway(tmp_path, "a", backend="redis", redis_url=url))
        b = stack.enter_context(_gateway(tmp_path, "b", backend="redis", redis_url=url))
        statuses = [_ask(a if i % 2 else b) for i in range(RATE)]
        assert statuses == [200] * RATE
        assert _ask(a) == 429 and _ask(b) == 429  # the budget is spent on both
        assert _ask(a, OTHER) == 200  # per key


def test_in_process_buckets_allow_the_rate_per_replica(tmp_path: Path):
    """What the Redis backend fixes: two replicas with their own buckets allow twice the rate."""
    with ExitStack() as stack:
        a = stack.enter_context(_gateway(tmp_path, "a"))
        b = stack.enter_context(_gateway(tmp_path, "b"))
        assert [_ask(a) for _ in range(RATE)] == [200] * RATE
        assert [_ask(b) for _ in range(RATE)] == [200] * RATE
        assert _ask(a) == 429


async def test_the_redis_bucket_refills_at_its_rate(redis_server):
    url, _ = redis_server
    limiter = RedisLimiter(url, 60)  # one a second, bursts of 60
    waits = [await limiter.wait_s("k") for _ in range(61)]
    assert waits[:60] == [0.0] * 60
    assert 0.9 <= waits[60] <= 1.0
    await asyncio.sleep(1.05)
    assert await limiter.wait_s("k") == 0.0
    await limiter.close()


def test_requests_are_served_when_redis_is_gone(tmp_path: Path, redis_server):
    url, proc = redis_server
    with _gateway(tmp_path, "a", backend="redis", redis_url=url) as a:
        assert _ask(a) == 200
        proc.kill()
        proc.wait(timeout=10)
        # In-process buckets take over: still limited, never failed.
        assert [_ask(a) for _ in range(RATE)] == [200] * RATE
        assert _ask(a) == 429
        metrics = a.get("/metrics").text
        assert "obliviate_shared_limit_fallbacks_total 7.0" in metrics  # every check since


@pytest.mark.parametrize("missing", [None])
def test_redis_backend_needs_a_url(missing):
    with pytest.raises(ValueError, match="redis_url"):
        Settings(admin_enabled=False, limits=LimitsSettings(backend="redis", redis_url=missing))
