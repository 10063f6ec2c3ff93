"""Prometheus metrics on a registry of the app's own (no process-global state)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_GUARD_BUCKETS = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01,
    0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


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
            "Guard decisions per target (passed requests have target='none')",
            ["target", "action"],
            registry=self.registry,
        )
        self.guard_seconds = Histogram(
            "obliviate_guard_seconds",
            "Time the guard adds before the engine sees a request",
            # Fine enough for histogram_quantile to read a p50 of a few ms and its p99.
            buckets=_GUARD_BUCKETS,
            registry=self.registry,
        )

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
            self.metrics.in_flight.dec()
            route = _route_name(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _route_name(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
