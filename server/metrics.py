"""Prometheus metrics on a registry of the app's own (no process-global state)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import AuthenticationError, GatewayError, NotFoundError, error_body

REQUEST_STARTED: ContextVar[float | None] = ContextVar("obliviate_request_started", default=None)
"""perf_counter() when the request entered the app (set by MetricsMiddleware for its task)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_GUARD_BUCKETS = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01,
    0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


_GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Requests by route and status, latency, tokens in and out, in-flight, guard decisions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "obliviate_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "obliviate_request_seconds",
            "Time from request to the last byte of the response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "obliviate_requests_in_flight", "Requests being served", registry=self.registry
        )
        self.tokens = Counter(
            "obliviate_tokens", "Tokens processed", ["kind"], registry=self.registry
        )
        self.decisions = Counter(
            "obliviate_guard_decisions",
            "Guard decisions per target and tenant (passed requests have target='none'; "
            "tenant '-' for callers without one)",
            ["target", "action", "tenant"],
            registry=self.registry,
        )
        self.guard_reads = Counter(
            "obliviate_guard_reads",
            "Texts the guard's classifier read (prompts, and the output guard's windows), by "
            "where: `loop` (static stage, on the event loop) or `thread` (both stages, on the "
            "guard's thread)",
            ["path"],
            registry=self.registry,
        )
        self.guard_seconds = Histogram(
            "obliviate_guard_seconds",
            "Time the guard adds before the engine sees a request",
            # Fine enough for histogram_quantile to read a p50 of a few ms and its p99.
            buckets=_GUARD_BUCKETS,
            registry=self.registry,
        )

        self.admission_seconds = Histogram(
            "obliviate_admission_seconds",
            "Time from a request's arrival until its prompt is decided (untouched or protected) "
            "and goes to the engine: the guard's own time and the wait for the event loop "
            "behind other requests. Compared with the same gateway at no target, it shows what "
            "the guard adds.",
            buckets=_GUARD_BUCKETS,
            registry=self.registry,
        )
        self.gc_pause_seconds = Histogram(
            "obliviate_gc_pause_seconds",
            "Pauses of Python's cycle collector in the gateway's process, by generation: every "
            "thread waits for them (recorded where the gateway owns its process)",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=self.registry,
        )
        self.gc_frozen = Gauge(
            "obliviate_gc_frozen_objects",
            "Objects in the permanent generation, which full collections skip: the heap is "
            "frozen once the engine is up (where the gateway owns its process)",
            registry=self.registry,
        )
        # Set when the heap is frozen (server.heap.freeze_heap), not read at each scrape:
        # gc.get_freeze_count() walks the whole permanent generation, ~70 ms on the event
        # loop for a gateway's few million objects.
        self.shared_limit_fallbacks = Counter(
            "obliviate_shared_limit_fallbacks",
            "Rate-limit checks done in process because the shared store (Redis) did not answer",
            registry=self.registry,
        )
        self.targets_enforced = Gauge(
            "obliviate_targets_enforced",
            "Targets this gateway enforces now",
            registry=self.registry,
        )
        self.target_load_failed = Gauge(
            "obliviate_target_load_failed",
            "1 for each target whose active version this gateway cannot load (see /admin/targets)",
            ["target"],
            registry=self.registry,
        )

    def set_target_health(self, enforced: int, failed: Mapping[str, str]) -> None:
        """Targets enforced, and those that failed to load (by id)."""
        self.targets_enforced.set(enforced)
        self.target_load_failed.clear()
        for target_id in failed:
            self.target_load_failed.labels(target_id).set(1)

    def watch_engine(self, running: Callable[[], int]) -> None:
        """Export the engine's own count of running requests (drops when one is aborted)."""
        gauge = Gauge(
            "obliviate_engine_requests_running",
            "Requests the engine is working on",
            registry=self.registry,
        )
        gauge.set_function(lambda: float(running()))

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)

    def observe_admission(self) -> None:
        """A prompt of the current request is decided: its time since the request arrived."""
        started = REQUEST_STARTED.get()
        if started is not None:
            self.admission_seconds.observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP request by its route template once the response is done."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        started = REQUEST_STARTED.set(start)
        status = 500
        self.metrics.in_flight.inc()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            REQUEST_STARTED.reset(started)
            self.metrics.in_flight.dec()
            route = _route_name(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


METRICS_PATH = "/metrics"


class MetricsAuthMiddleware:
    """Pure ASGI in front of /metrics, closed by default.

    Per-target decision counters tell whoever reads them, in real time, whether a probe was
    flagged, so /metrics on the API port needs a bearer token (the metrics token or the admin
    token), unless the operator opened it (`public`) or serves it on its own listener
    (`elsewhere`: then the API port answers 404).
    """

    def __init__(self, app: ASGIApp, *, tokens: list[str], public: bool, elsewhere: bool) -> None:
        self.app = app
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens if t]
        self._public = public
        self._elsewhere = elsewhere

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != METRICS_PATH:
            await self.app(scope, receive, send)
            return
        if self._elsewhere:
            await _send(send, NotFoundError("No such route (metrics are on their own port)"))
            return
        if self._public or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await _send(
            send,
            AuthenticationError(
                "/metrics needs Authorization: Bearer <metrics token or admin token>",
                code="invalid_metrics_token",
            ),
            [(b"www-authenticate", b'Bearer realm="obliviate-metrics"')],
        )

    def _authorized(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        scheme, _, token = given.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        # Every digest is compared (no early exit): the timing says nothing about which matched.
        matches = [hmac.compare_digest(digest, d) for d in self._digests]
        return any(matches)


async def _send(
    send: Send, err: GatewayError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
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


def start_metrics_server(metrics: Metrics, host: str, port: int) -> Callable[[], None]:
    """Serve /metrics on its own listener (prometheus_client's); returns its stop function."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def _route_name(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
