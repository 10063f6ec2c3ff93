"""Closed by default where it leaks: the body-size limit (413 before parsing), caps on token-id
prompts and numeric fields (400 + param), and /metrics behind a token or on its own port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.launch import free_port
from server.settings import GuardSettings, LimitsSettings, Settings
from tests.hardening.test_limits import _envelope, chat

ADMIN = "admin-token-0123456789abcdef"
METRICS = "metrics-token-0123456789"


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("caps")
    settings = Settings(
        data_dir=tmp / "data",
        model_cache_dir=tmp / "models",
        admin_enabled=False,
        guard=GuardSettings(enabled=False),
        limits=LimitsSettings(max_prompt_tokens=16, max_tokens=64, max_body_bytes=4096),
    )
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        yield client


def completion(prompt: object, **extra: object) -> dict:
    return {"model": "fake-model", "prompt": prompt, "max_tokens": 4, **extra}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", completion(list(range(17))), "prompt"),
        ("/v1/completions", completion([[1, 2], list(range(17))]), "prompt"),
        ("/v1/completions", completion([1, -1, 2]), "prompt"),
        ("/v1/completions", completion([1, 2**40]), "prompt"),
        ("/v1/completions", completion("hi", seed=2**63), "seed"),
        ("/v1/chat/completions", chat(seed=-(2**63) - 1), "seed"),
        ("/v1/chat/completions", chat(top_k=2**40), "top_k"),
        ("/v1/chat/completions", chat(logit_bias={"1": 1e9}), "logit_bias"),
        ("/v1/chat/completions", chat(logit_bias={str(i): 1 for i in range(301)}), "logit_bias"),
        ("/v1/chat/completions", chat(min_tokens=65), "min_tokens"),
        ("/v1/completions", completion("hi", min_tokens=65), "min_tokens"),
    ],
)
def test_out_of_range_fields_are_400_with_param(capped: TestClient, path, body, param):
    _envelope(capped.post(path, json=body), 400, param)


def test_fields_at_their_limits_pass(capped: TestClient):
    ok = [
        ("/v1/completions", completion(list(range(16)))),
        ("/v1/completions", completion("hi", seed=2**63 - 1)),
        ("/v1/chat/completions", chat(seed=-(2**63), logit_bias={"5": -100}, min_tokens=4)),
    ]
    for path, body in ok:
        response = capped.post(path, json=body)
        assert response.status_code == 200, (body, response.text)


def test_a_body_over_the_limit_is_413_before_it_is_parsed(capped: TestClient):
    big = chat("x" * 5000)
    error = _envelope(capped.post("/v1/chat/completions", json=big), 413)
    assert error["code"] == "request_too_large" and "max-body-bytes" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    streamed = capped.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert _envelope(streamed, 413)["code"] == "request_too_large"
    assert capped.post("/v1/chat/completions", json=chat("x" * 100)).status_code == 200


def test_a_huge_json_number_is_a_400_not_a_500(capped: TestClient):
    body = b'{"model": "fake-model", "prompt": "hi", "seed": ' + b"9" * 3000 + b"}"
    response = capped.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text


def _metrics_app(tmp_path: Path, **settings: object) -> TestClient:
    base: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "model_cache_dir": tmp_path / "models",
        "guard": GuardSettings(enabled=False),
        "admin_enabled": False,
    }
    return TestClient(create_app(Settings(**{**base, **settings}), engine=FakeEngine()))  # type: ignore[arg-type]


def test_metrics_need_a_token_by_default(tmp_path: Path):
    with _metrics_app(tmp_path, admin_token=ADMIN, metrics={"token": METRICS}) as client:
        refused = client.get("/metrics")
        assert _envelope(refused, 401)["code"] == "invalid_metrics_token"
        assert refused.headers["www-authenticate"].startswith("Bearer")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope-nope-nope"})
        assert wrong.status_code == 401
        for token in (METRICS, ADMIN):
            response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
            assert "obliviate_requests_total" in response.text
        assert client.get("/health").status_code == 200  # nothing else changes


def test_metrics_on_their_own_port(tmp_path: Path):
    port = free_port()
    with _metrics_app(tmp_path, admin_token=ADMIN, metrics={"port": port}) as client:
        client.get("/health")
        auth = {"Authorization": f"Bearer {ADMIN}"}
        assert _envelope(client.get("/metrics", headers=auth), 404)
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert scraped.status_code == 200
        assert 'obliviate_requests_total{route="/health",status="200"}' in scraped.text
    with pytest.raises(httpx.ConnectError):  # stopped with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_open_only_when_asked(tmp_path: Path):
    with _metrics_app(tmp_path, admin_token=ADMIN, metrics={"public": True}) as client:
        assert client.get("/metrics").status_code == 200
    with _metrics_app(tmp_path, admin_insecure_dev=True, admin_enabled=True) as client:
        assert client.get("/metrics").status_code == 200  # development mode: no token anywhere
