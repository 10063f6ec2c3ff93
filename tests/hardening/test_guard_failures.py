"""A registered target on the fake engine with the real classifier and the served model's
embeddings: guard.fail_closed with an injected classifier error, and logs that never carry the
admin token or prompt text (log_prompts is off by default)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from classifier import ClassifierBank
from server.app import create_app
from server.engine import ChatPrompt, PromptEmbeds, TextPrompt
from server.engine.fake import FakeEngine
from server.metrics import Metrics
from server.services.failsafe import FailSafeGuard
from server.settings import GuardSettings, Settings
from tests.conftest import ADMIN_TOKEN
from tests.server.test_admin_api import AUTH, HARRY, wait_for_job

SECRET_PROMPT = "Which house at Hogwarts was Harry Potter sorted into, zebra-quartz-17?"
PLAIN_PROMPT = "How do volcanoes form, marmalade-sextant-42?"


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


@pytest.fixture(scope="module")
def logs() -> Iterator[_Everything]:
    handler = _Everything()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from server.modelstore import resolve_model

    try:
        return resolve_model(None, auto_pull=True)
    except Exception as e:  # no packaged model here: nothing to corrupt with
        pytest.skip(f"the default model cannot be had here: {e}")


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
    logs: _Everything,
    model_dir: Path,
    engine: FakeEngine,
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("guard-failures")
    settings = Settings(
        data_dir=root / "data",
        model=str(model_dir),
        admin_token=ADMIN_TOKEN,
        guard=GuardSettings(fail_closed=True, calibrate_strength=False),
    )
    with TestClient(create_app(settings, engine=engine)) as test_client:
        job = test_client.post("/admin/targets", json=HARRY, headers=AUTH).json()
        assert wait_for_job(test_client, job["id"], timeout=600)["status"] == "succeeded"
        yield test_client


def chat(content: str) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}]}


def test_flagged_and_plain_prompts_as_usual(client: TestClient, engine: FakeEngine):
    assert client.post("/v1/chat/completions", json=chat(SECRET_PROMPT)).status_code == 200
    assert isinstance(engine.history[-1].prompt, PromptEmbeds)
    assert client.post("/v1/chat/completions", json=chat(PLAIN_PROMPT)).status_code == 200
    assert isinstance(engine.history[-1].prompt, ChatPrompt)


def test_fail_closed_treats_a_classifier_error_as_flagged(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
):
    def broken(self: ClassifierBank, groups: list[list[str]], **options: object) -> list[object]:
        raise RuntimeError("injected classifier failure")

    # Both paths: the static stage on the event loop and both stages on the guard's thread.
    monkeypatch.setattr(ClassifierBank, "classify_groups", broken)
    monkeypatch.setattr(ClassifierBank, "settled_groups", broken)
    response = client.post("/v1/chat/completions", json=chat(PLAIN_PROMPT))
    assert response.status_code == 200, response.text
    # Even a harmless prompt is corrupted: the guard could not vouch for it.
    assert isinstance(engine.history[-1].prompt, PromptEmbeds)
    monkeypatch.undo()
    assert client.post("/v1/chat/completions", json=chat(PLAIN_PROMPT)).status_code == 200
    assert isinstance(engine.history[-1].prompt, ChatPrompt)


class _BrokenGuard:
    async def protect(self, prompt: object, request_id: str) -> object:
        raise RuntimeError("injected classifier failure")


async def test_fail_open_sends_the_prompt_unguarded_and_fail_closed_without_model_refuses():
    prompt = TextPrompt("hello")
    fail_open = FailSafeGuard(_BrokenGuard(), None, Metrics(), fail_closed=False)  # type: ignore[arg-type]
    assert (await fail_open.protect(prompt, "r1")).prompt is prompt
    assert fail_open.failures == 1
    fail_closed = FailSafeGuard(_BrokenGuard(), None, Metrics(), fail_closed=True)  # type: ignore[arg-type]
    from server.errors import UnavailableError

    with pytest.raises(UnavailableError) as refused:
        await fail_closed.protect(prompt, "r2")
    assert refused.value.code == "guard_unavailable"


def test_logs_carry_neither_the_admin_token_nor_prompts(client: TestClient, logs: _Everything):
    client.post("/v1/chat/completions", json=chat(SECRET_PROMPT))
    client.post("/v1/chat/completions", json=chat(PLAIN_PROMPT))
    client.post("/v1/completions", json={"model": "fake-model", "prompt": SECRET_PROMPT})
    client.post("/admin/classify", json={"prompt": SECRET_PROMPT}, headers=AUTH)
    client.get("/admin/targets", headers={"Authorization": "Bearer wrong-token-0123456789"})
    text = "\n".join(logs.lines)
    assert "flagged request_id=" in text  # the audit line is there, just without the prompt
    for secret in (ADMIN_TOKEN, "zebra-quartz-17", "marmalade-sextant-42", "wrong-token"):
        assert secret not in text
    for example in HARRY["forget_examples"][2:]:
        assert str(example) not in text
