"""Graceful shutdown: on SIGTERM stop taking work, let the work in flight finish, then stop.

SIGTERM (or the first SIGINT)
  ├─ at once: /ready answers 503 (load balancers take the replica out) and new /v1 requests get
  │  503 in the OpenAI envelope; the port stays open so clients get an answer, not a reset
  ├─ /v1 requests in flight (streams included) run to their end, for up to `grace_s` seconds
  └─ then uvicorn's own shutdown: close the port, run the lifespan's end (the engine stops)
A second signal skips the wait.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import UnavailableError, error_body

logger = logging.getLogger(__name__)

DRAINED_PATH_PREFIX = "/v1/"


class Drain:
    """Whether the process is draining, and how many /v1 requests are still in flight."""

    def __init__(self, on_begin: Callable[[], None] | None = None) -> None:
        self.draining = False
        self.in_flight = 0
        self._on_begin = on_begin

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            if self._on_begin is not None:
                self._on_begin()


class DrainMiddleware:
    """Pure ASGI: counts /v1 requests in flight (until their last byte); 503 while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(
            DRAINED_PATH_PREFIX
        ):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            body = json.dumps(error_body(UnavailableError("The server is shutting down"))).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        (b"retry-after", b"1"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, *, grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s
        self._deadline: float | None = None
        self._signal: str | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._deadline is None and not self.should_exit:
            # Runs as a signal handler on the loop's thread: only set flags here (no logging,
            # whose locks the interrupted code may hold).
            self._deadline = time.monotonic() + self.grace_s
            self._signal = signal.Signals(sig).name
            self.drain.begin()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._signal is not None:
            logger.info(
                "Received %s: draining (%d requests in flight, up to %.0f s)",
                self._signal,
                self.drain.in_flight,
                self.grace_s,
            )
            self._signal = None
        if self._deadline is not None and not self.should_exit:
            if self.drain.in_flight == 0:
                logger.info("Drained: shutting down")
                self.should_exit = True
            elif time.monotonic() >= self._deadline:
                logger.warning(
                    "Grace period over with %d requests in flight: shutting down",
                    self.drain.in_flight,
                )
                self.should_exit = True
        return await super().on_tick(counter)
