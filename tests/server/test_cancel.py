"""A request whose client hangs up is cancelled, and its engine request with it.

Raw ASGI calls (no test client in between), so the test says exactly when the client goes: the
body first, then `http.disconnect` once the request is under way. The real engine's side is
tests/e2e/test_openai_on_vllm.py::test_client_disconnect_aborts_a_request_that_is_not_streamed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.app import create_app
from server.engine.base import GenerationChunk, GenerationRequest
from server.engine.fake import FakeEngine
from server.settings import Settings


class HangingEngine(FakeEngine):
    """Writes its first token, then waits for ever (until the request is cancelled)."""

    def __init__(self) -> None:
        super().__init__(max_model_len=4096)
        self.closed = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        inner = super().generate(request)
        try:
            yield await anext(inner)
            await asyncio.sleep(3600)
        finally:
            await inner.aclose()  # the fake's count of running requests drops now
            self.closed += 1


def _start(
    app: Any, body: dict[str, Any], hang_up_after: float
) -> tuple[asyncio.Future[None], list[int]]:
    """POST /v1/chat/completions, in a task of its own: the client hangs up `hang_up_after` s
    in. The task, and the statuses it sends."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(hang_up_after)
        return {"type": "http.disconnect"}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    return asyncio.ensure_future(app(scope, receive, send)), statuses


async def _call(app: Any, body: dict[str, Any], hang_up_after: float) -> list[int]:
    """POST /v1/chat/completions; the client hangs up `hang_up_after` s in. The statuses sent."""
    call, statuses = _start(app, body, hang_up_after)
    done, _ = await asyncio.wait({call}, timeout=10)
    if not done:  # the disconnect did not end it: not the test's place to cancel it for it
        call.cancel()
        raise AssertionError("the request went on after its client hung up")
    call.result()
    return statuses


BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


def _app(tmp_path: Path) -> tuple[Any, HangingEngine]:
    """The gateway on a HangingEngine, guard and admin off."""
    engine = HangingEngine()
    settings = Settings(
        data_dir=tmp_path / "data",
        model_cache_dir=tmp_path / "models",
        admin_enabled=False,
        guard={"enabled": False},  # type: ignore[arg-type]
    )
    return create_app(settings, engine=engine), engine


def test_a_client_that_hangs_up_cancels_its_request_and_the_engine_request(
    tmp_path: Path,
) -> None:
    app, engine = _app(tmp_path)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            # Hangs up at once, and once the engine is writing.
            for after in (0.0, 0.2):
                before = engine.closed
                statuses = await _call(app, BODY, hang_up_after=after)
                assert statuses == [499]
                for _ in range(100):  # the cancelled work may finish a few loop passes later
                    if engine.running == 0:
                        break
                    await asyncio.sleep(0.01)
                assert engine.closed == before + 1
                assert engine.running == 0

    asyncio.run(scenario())


def test_cancelling_the_route_cancels_the_engine_request(tmp_path: Path) -> None:
    """The server cancels a request's task (a shutdown, a timeout): the engine request goes too,
    not left writing for nobody."""
    app, engine = _app(tmp_path)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            call, _ = _start(app, BODY, hang_up_after=3600)
            for _ in range(100):
                if engine.running == 1:
                    break
                await asyncio.sleep(0.01)
            assert engine.running == 1
            call.cancel()
            for _ in range(100):
                if engine.closed == 1:
                    break
                await asyncio.sleep(0.01)
            assert call.cancelled()
            assert engine.closed == 1
            assert engine.running == 0

    asyncio.run(scenario())
