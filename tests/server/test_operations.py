"""Operations on the fake engine: request ids in headers and logs, JSON logs, the drain, doctor."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import main
from server.doctor import check_engine, check_registry, check_settings, run_checks
from server.engine.fake import FakeEngine
from server.logs import RequestIdFilter, configure_logging
from server.registry import SCHEMA_VERSION
from server.settings import Settings

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def test_request_id_is_kept_or_made_and_returned(client: TestClient):
    given = client.get("/health", headers={"X-Request-ID": "abc-123_x"})
    assert given.headers["x-request-id"] == "abc-123_x"
    made = client.get("/health")
    assert len(made.headers["x-request-id"]) == 32
    insane = client.get("/health", headers={"X-Request-ID": "no spaces; or <html>"})
    assert insane.headers["x-request-id"] != "no spaces; or <html>"
    chat = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "chat-1"})
    assert chat.status_code == 200, chat.text
    assert chat.headers.get_list("x-request-id") == ["chat-1"]  # once, not twice


def test_every_log_record_of_a_request_carries_its_id(client: TestClient, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("test.inside")

    @client.app.get("/log-something")  # type: ignore[attr-defined]
    async def log_something() -> dict[str, str]:
        logger.warning("inside the request")
        await asyncio.to_thread(logger.warning, "inside a worker thread")
        return {}

    with caplog.at_level(logging.WARNING):
        client.get("/log-something", headers={"X-Request-ID": "req-42"})
        logger.warning("outside any request")
    ids = {r.getMessage(): r.request_id for r in caplog.records if r.name == "test.inside"}
    assert ids == {
        "inside the request": "req-42",
        "inside a worker thread": "req-42",
        "outside any request": "-",
    }


def test_json_log_lines(monkeypatch):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json")
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("obliviate.test").info("hello %s", "world")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    line = json.loads(stream.getvalue().strip())
    assert line["message"] == "hello world"
    assert line["level"] == "INFO" and line["logger"] == "obliviate.test"
    assert line["request_id"] == "-"


class GatedEngine(FakeEngine):
    """The fake engine, holding every generation until `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def generate(self, request):  # type: ignore[override]
        await self.gate.wait()
        async for chunk in super().generate(request):
            yield chunk


async def test_drain_lets_in_flight_requests_finish_and_refuses_new_ones(tmp_path: Path):
    settings = Settings(data_dir=tmp_path, admin_enabled=False, guard={"enabled": False})
    engine = GatedEngine()
    app = create_app(settings, engine=engine)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            slow = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
            while app.state.drain.in_flight == 0:
                await asyncio.sleep(0.01)
            app.state.drain.begin()
            ready = await client.get("/ready")
            assert ready.status_code == 503
            refused = await client.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "service_unavailable"
            assert (await client.get("/health")).status_code == 200  # liveness stays up
            engine.gate.set()
            finished = await slow
            assert finished.status_code == 200, finished.text
            assert app.state.drain.in_flight == 0


def test_doctor_reports_what_to_fix(tmp_path: Path, capsys):
    findings = check_settings(Settings.model_construct(admin_enabled=True, admin_token=None,
                                                       admin_insecure_dev=False))  # fmt: skip
    assert findings[0].level == "fail" and "OBLIVIATE_ADMIN_TOKEN" in findings[0].fix

    unreachable = Settings(
        data_dir=tmp_path, admin_token="x" * 20, registry_url="postgresql://u@127.0.0.1:1/x"
    )
    (registry,) = check_registry(unreachable)
    assert registry.level == "fail" and "--registry-url" in registry.fix

    upstream = Settings(
        data_dir=tmp_path,
        admin_token="x" * 20,
        engine="openai_upstream",
        upstream={"url": "http://127.0.0.1:1/v1"},
    )
    (engine,) = check_engine(upstream)
    assert engine.level == "fail" and "upstream" in engine.message

    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--data-dir", str(tmp_path), "--registry-url", "postgresql://u@127.0.0.1:1/x",
              "--model", str(tmp_path / "nowhere")])  # fmt: skip
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "FAIL  admin token" in out and "FAIL  registry" in out and "FAIL  model" in out
    assert "problem(s) to fix" in out


def test_doctor_passes_on_a_sound_set_up(tmp_path: Path, postgres_url: str, monkeypatch):
    from server.registry import Registry

    Registry(postgres_url).close()
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (model / name).write_text("{}")
    settings = Settings(
        data_dir=tmp_path,
        admin_token="x" * 20,
        registry_url=postgres_url,
        model=str(model),
    )
    findings = {f.check: f for f in run_checks(settings)}
    registry = findings["registry"]
    assert registry.level == "ok" and f"schema {SCHEMA_VERSION}" in registry.message
    assert findings["model"].level == "ok"
    assert findings["admin token"].level == "ok"


def test_shutdown_stops_the_classifier_warm_up(
    settings: Settings, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
):
    """A gateway stopped right after it started does not first embed the shipped negatives (tens
    of seconds of CPU here; past a pod's grace period): the warm-up ends at its next batch."""
    from classifier import embed

    monkeypatch.setattr(embed, "_CORPORA", {})  # as in a fresh process; restored afterwards
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        assert client.get("/health").status_code == 200
        # what it embeds is kept beside the models, for the next start (test_model.py)
        assert settings.model_cache_dir is not None
        embedder = client.app.state.targets._embedder  # type: ignore[attr-defined]
        assert embedder.corpus_dir == settings.model_cache_dir / "corpus-embeddings"
    assert not any(name.startswith("general/") for _, name, _ in embed._CORPORA)
