"""No request hops to a worker thread on its way through FastAPI.

FastAPI runs a plain (`def`) endpoint or dependency on a worker thread: one thread hop, and under a
burst a wait for the GIL behind the busy event loop, per dependency per request. The gateway's
endpoints and dependencies are all `async def`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import fastapi.dependencies.utils
import fastapi.routing
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    if dependant.call is not None:
        yield dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub)


def test_every_endpoint_and_dependency_is_async(settings: Settings) -> None:
    app = create_app(settings, engine=FakeEngine())
    plain = sorted(
        {
            f"{route.path}: {call.__module__}.{call.__qualname__}"
            for route in app.routes
            if isinstance(route, APIRoute)
            for call in _calls(route.dependant)
            if not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))
        }
    )
    assert plain == []


def test_a_chat_request_runs_nothing_on_a_worker_thread(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops: list[str] = []
    real = fastapi.dependencies.utils.run_in_threadpool

    async def counted(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__qualname__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", counted)
    monkeypatch.setattr(fastapi.routing, "run_in_threadpool", counted)
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", {"prompt": "Hi"}),
    ):
        got = client.post(path, json={"model": "fake-model", "max_tokens": 4, **body})
        assert got.status_code == 200, got.text
    assert hops == []
