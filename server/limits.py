"""Abuse and overload limits of /v1: API keys, per-key rate limits, a bounded queue, sizes.

    request ──> V1Gate (pure ASGI, /v1 only)
                 ├─ API keys set and none or a wrong one given ──> 401
                 ├─ the key's token bucket is empty               ──> 429 + Retry-After
                 ├─ every slot busy and the queue full            ──> 429 + Retry-After
                 └─ waits for a slot (held until the response, stream included, has ended)
    GenerationService ──> RequestLimits (server.services.request_limits): prompt size,
                          max_tokens, n ──> 400 with param

Every refusal is the OpenAI error envelope (`server.errors`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from typing import Protocol

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import ApiKeys
from server.errors import (
    AuthenticationError,
    GatewayError,
    PayloadTooLargeError,
    RateLimitError,
    error_body,
)

V1_PREFIX = "/v1/"
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class TokenBucket:
    """`rate` requests per minute, bursts up to `rate`; refilled continuously."""

    def __init__(self, per_minute: int, clock: float) -> None:
        self.capacity = float(per_minute)
        self.per_second = per_minute / 60.0
        self.tokens = self.capacity
        self.stamp = clock

    def take(self, now: float) -> float:
        """0 when a request may go now, else the seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.per_second


class RateLimiter:
    """One token bucket per key (least recently used buckets beyond `max_keys` are dropped)."""

    def __init__(self, per_minute: int, max_keys: int = 100_000) -> None:
        self._per_minute = per_minute
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def wait_s(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._per_minute, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)


class Limiter(Protocol):
    """A per-key rate limit: in process (`LocalLimiter`) or shared (`server.shared_limits`)."""

    async def wait_s(self, key: str) -> float:
        """0 when a request of `key` may go now, else the seconds until one may."""
        ...


class LocalLimiter:
    """The in-process token buckets: the single-gateway default."""

    def __init__(self, per_minute: int) -> None:
        self._buckets = RateLimiter(per_minute)

    async def wait_s(self, key: str) -> float:
        return self._buckets.wait_s(key)


class AdmissionQueue:
    """At most `slots` requests run; at most `queue` wait; the rest are refused at once."""

    def __init__(self, slots: int, queue: int) -> None:
        self.slots = slots
        self.queue = queue
        self.running = 0
        self.waiting = 0
        self.refused = 0
        self._free: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._free is None:  # created on first use, inside the serving event loop
            self._free = asyncio.Semaphore(self.slots)
        return self._free

    def admit(self) -> bool:
        """Whether a request may take a slot or a place in the queue (counted as waiting)."""
        if self.running + self.waiting >= self.slots + self.queue:
            self.refused += 1
            return False
        self.waiting += 1
        return True

    async def acquire(self) -> None:
        """Wait for a slot (after `admit()`)."""
        try:
            await self._semaphore().acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._semaphore().release()


class V1Gate:
    """Pure ASGI middleware in front of /v1: keys, rate limits, the admission queue."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: ApiKeys,
        rate: Limiter | None,
        admission: AdmissionQueue,
        retry_after_s: int,
    ) -> None:
        self.app = app
        self._keys = keys
        self._rate = rate
        self._admission = admission
        self._retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith(V1_PREFIX) or path == "/v1"):
            await self.app(scope, receive, send)
            return
        identity = self._keys.identify(_bearer(scope))
        if identity is None:
            await send_error(
                send,
                AuthenticationError(
                    "Missing or invalid API key (Authorization: Bearer <key>)",
                    code="invalid_api_key",
                ),
                [(b"www-authenticate", b'Bearer realm="obliviate"')],
            )
            return
        if self._rate is not None:
            key = identity or f"addr:{(scope.get('client') or ('?', 0))[0]}"
            wait = await self._rate.wait_s(key)
            if wait > 0:
                await send_error(
                    send,
                    RateLimitError(
                        "Rate limit reached for this API key; retry after the time in Retry-After.",
                        code="rate_limit_exceeded",
                    ),
                    [(b"retry-after", str(max(1, math.ceil(wait))).encode())],
                )
                return
        if path not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._admission.admit():
            await send_error(
                send,
                RateLimitError(
                    "The server is at capacity (every slot busy and the queue full); retry "
                    "after the time in Retry-After.",
                    code="server_overloaded",
                ),
                [(b"retry-after", str(self._retry_after_s).encode())],
            )
            return
        await self._admission.acquire()
        try:
            await self.app(scope, receive, send)
        finally:
            self._admission.release()


class BodyTooLargeError(HTTPException):
    """Raised from `receive` when a streamed body passes the limit (FastAPI re-raises
    HTTPExceptions from its body parsing, and the app's handler answers with the envelope)."""


class BodyLimitMiddleware:
    """Pure ASGI: refuse bodies over `max_bytes` with 413 before anything parses them.

    A declared Content-Length over the limit is refused without reading a byte; a chunked body is
    counted as it arrives and refused as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"The request body is larger than this server accepts ({self.max_bytes} bytes; "
            "--limits.max-body-bytes).",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await send_error(send, self._error())
                    return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLargeError(413, self._error().message)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if not started:
                await send_error(send, self._error())


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


async def send_error(
    send: Send, err: GatewayError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with the error envelope from inside ASGI middleware."""
    body = json.dumps(error_body(err)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": int(err.status_code),
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
