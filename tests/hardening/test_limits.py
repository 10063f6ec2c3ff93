"""/v1 limits on the fake engine: sizes (400 + param), API keys (401), rate limits and the
admission queue (429 + Retry-After), all in the OpenAI error envelope."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from server.app import create_app
from server.auth import ApiKeys
from server.engine.fake import FakeEngine
from server.limits import AdmissionQueue, RateLimiter, TokenBucket, V1Gate
from server.settings import GuardSettings, LimitsSettings, Settings

KEY = "sk-test-key-0123456789"


def _settings(tmp_path: Path, **limits: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        model_cache_dir=tmp_path / "models",
        admin_enabled=False,
        guard=GuardSettings(enabled=False),
        limits=LimitsSettings(**limits),  # type: ignore[arg-type]
    )


def _envelope(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return dict(error)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("limits")
    settings = _settings(tmp, max_prompt_chars=200, max_tokens=64, max_n=2)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        yield client


def chat(content: str = "hi", **extra: object) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat("x" * 201), "messages"),
        ("/v1/chat/completions", chat(max_tokens=65), "max_tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens=65), "max_completion_tokens"),
        ("/v1/chat/completions", chat(n=3), "n"),
        ("/v1/completions", {"model": "fake-model", "prompt": "y" * 201}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": ["a", "b", "c"]}, "prompt"),
        ("/v1/completions", {"model": "fake-model", "prompt": "a", "max_tokens": 65}, "max_tokens"),
        ("/v1/completions", {"model": "fake-model", "prompt": "a", "n": 3}, "n"),
    ],
)
def test_size_limits_are_400_with_param(limited: TestClient, path: str, body: dict, param: str):
    error = _envelope(limited.post(path, json=body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_requests_within_limits_pass(limited: TestClient):
    ok = limited.post("/v1/chat/completions", json=chat("x" * 200, max_tokens=64, n=2))
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["choices"]) == 2


def test_api_keys_guard_v1_only(tmp_path: Path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# one key a line\n\nsk-from-file-0123456789\n")
    settings = _settings(tmp_path, api_keys=[KEY], api_keys_file=key_file)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            refused = client.post("/v1/chat/completions", json=chat(), headers=headers)
            error = _envelope(refused, 401)
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        _envelope(client.get("/v1/models"), 401)
        for key in (KEY, "sk-from-file-0123456789"):
            auth = {"Authorization": f"Bearer {key}"}
            assert client.post("/v1/chat/completions", json=chat(), headers=auth).status_code == 200
            assert client.get("/v1/models", headers=auth).status_code == 200
        assert client.get("/health").status_code == 200  # health stays open for probes


def test_per_key_rate_limit_is_429_with_retry_after(tmp_path: Path):
    other = "sk-other-key-0123456789"
    settings = _settings(tmp_path, api_keys=[KEY, other], requests_per_minute=3)
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=chat(), headers=auth).status_code == 200
        refused = client.post("/v1/chat/completions", json=chat(), headers=auth)
        error = _envelope(refused, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 20
        # Another key has its own bucket.
        auth2 = {"Authorization": f"Bearer {other}"}
        assert client.post("/v1/chat/completions", json=chat(), headers=auth2).status_code == 200


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(60, clock=0.0)  # one a second, bursts of 60
    assert all(bucket.take(0.0) == 0 for _ in range(60))
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0.0
    limiter = RateLimiter(1, max_keys=2)
    assert limiter.wait_s("a", 0.0) == 0 and limiter.wait_s("a", 1.0) > 0
    limiter.wait_s("b", 1.0)
    limiter.wait_s("c", 1.0)  # drops "a", the least recently used
    assert limiter.wait_s("a", 1.0) == 0


async def test_admission_queue_refuses_beyond_slots_plus_queue():
    """2 slots + 1 queued: the 4th concurrent request is a 429 at once; the rest complete."""
    release = asyncio.Event()
    started = 0

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal started
        started += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    admission = AdmissionQueue(slots=2, queue=1)
    gate = V1Gate(slow_app, keys=ApiKeys([]), rate=None, admission=admission, retry_after_s=3)
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        tasks = [asyncio.create_task(client.post("/v1/completions", json={})) for _ in range(3)]
        while started < 2 or admission.waiting < 1:
            await asyncio.sleep(0.01)
        assert (admission.running, admission.waiting) == (2, 1)
        refused = await client.post("/v1/chat/completions", json={})
        error = _envelope(refused, 429)
        assert error["code"] == "server_overloaded" and refused.headers["retry-after"] == "3"
        # Routes that generate nothing are not queued.
        models = asyncio.create_task(client.get("/v1/models"))
        release.set()
        done = await asyncio.gather(*tasks, models)
    assert [r.status_code for r in done] == [200, 200, 200, 200]
    assert (admission.running, admission.waiting, admission.refused) == (0, 0, 1)
