"""The app factory: settings in, FastAPI app out; the lifespan owns the engine and services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import Gauge
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.auth import AdminAuthMiddleware, ApiKeys
from server.console import ConsoleSessions
from server.deps import build_engine, build_guard, local_model_dir
from server.engine import Engine
from server.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    error_body,
    validation_message,
)
from server.heap import freeze_heap, watch_pauses
from server.limits import AdmissionQueue, BodyLimitMiddleware, Limiter, LocalLimiter, V1Gate
from server.logs import RequestIdMiddleware
from server.metrics import Metrics, MetricsAuthMiddleware, MetricsMiddleware, start_metrics_server
from server.registry import Registry
from server.routes import admin, health, openai, operations
from server.routes.console import console_error, mount_console
from server.services.activity import ActivityRecorder, AuditTrail
from server.services.failsafe import FailSafeGuard
from server.services.generation import GenerationService, PassthroughGuard, PromptGuard
from server.services.output_guard import OutputGuard, OutputWatcher
from server.services.playground import PlaygroundService
from server.services.registry_sync import RegistryPoller
from server.services.request_limits import RequestLimits
from server.services.responses import ResponsesService
from server.services.targets import TargetService
from server.settings import Settings
from server.shutdown import Drain, DrainMiddleware

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """Build the gateway. `engine` replaces the one the settings describe (tests, embedding)."""
    settings = settings or Settings()
    metrics = Metrics()
    activity = ActivityRecorder(
        metrics, bucket_s=settings.console.activity_bucket_s, keep=settings.console.activity_buckets
    )
    audit_trail = AuditTrail(settings.console.audit_entries)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A gateway that builds its engine owns its process, and so its garbage collector.
        owns_process = engine is None
        stop_watching = watch_pauses(metrics.gc_pause_seconds) if owns_process else None
        if engine is None:
            chosen, model_dir = await asyncio.to_thread(build_engine, settings)
        else:
            # An injected engine brings no model folder unless the settings name one.
            chosen, model_dir = engine, (local_model_dir(settings) if settings.model else None)
        app.state.engine = chosen
        guard: PromptGuard = PassthroughGuard()
        output: OutputWatcher | None = None
        targets: TargetService | None = None
        registry: Registry | None = None
        if settings.guard.enabled:
            registry = await asyncio.to_thread(
                lambda: Registry(
                    settings.registry_location(), keep_versions=settings.jobs.keep_versions
                )
            )
            eco, targets = await asyncio.to_thread(
                build_guard, settings, chosen, model_dir, registry, metrics
            )
            guard = FailSafeGuard(
                eco, eco.corruptor, metrics, fail_closed=settings.guard.fail_closed
            )
            if settings.guard.output:
                output = OutputGuard(
                    eco,
                    chosen,
                    metrics,
                    max_restarts=settings.guard.output_restarts,
                    classify=settings.guard.output_classifier,
                    window_words=settings.guard.output_window_words,
                )
        lim = settings.limits
        request_limits = RequestLimits(
            lim.max_prompt_chars, lim.max_prompt_tokens, lim.max_tokens, lim.max_n
        )
        app.state.generation = generation = GenerationService(
            chosen, guard, metrics, request_limits, output
        )
        app.state.responses = ResponsesService(generation)
        app.state.targets = targets
        if targets is not None:
            app.state.playground = PlaygroundService(targets, app.state.generation, chosen)
            app.state.activity, app.state.audit_trail = activity, audit_trail
            audit_trail.install()
            await activity.start()
        app.state.engine_failure = None
        app.state.draining = False
        frozen = metrics.gc_frozen if owns_process else None
        starter = asyncio.create_task(_start_engine(app, chosen, frozen=frozen))
        stop_metrics = None
        if settings.metrics.port is not None:
            host = settings.metrics.host or settings.host
            stop_metrics = start_metrics_server(metrics, host, settings.metrics.port)
        poller: RegistryPoller | None = None
        if targets is not None and registry is not None:
            seen = await asyncio.to_thread(registry.revision)
            await targets.start()
            if settings.registry_poll_interval > 0:
                # Other gateways on the same registry: their changes reach this one by polling.
                poller = RegistryPoller(
                    registry,
                    targets.sync,
                    interval_s=settings.registry_poll_interval,
                    retry=lambda: targets.needs_retry,
                )
                poller.start(seen)
        try:
            yield
        finally:
            app.state.draining = True
            starter.cancel()
            if stop_metrics is not None:
                stop_metrics()
            if poller is not None:
                await poller.stop()
            if targets is not None:
                await targets.stop()
                await activity.stop()
                audit_trail.remove()
            await chosen.stop()
            if registry is not None:
                registry.close()
            if stop_watching is not None:
                stop_watching()

    app = FastAPI(
        title="obliviate",
        summary="OpenAI-compatible gateway that makes a served LLM forget registered targets.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    # Registered once per app (not per lifespan): a restarted lifespan must not register it twice.
    metrics.watch_engine(lambda: getattr(getattr(app.state, "engine", None), "running", 0))
    app.state.drain = drain = Drain(on_begin=lambda: setattr(app.state, "draining", True))
    app.include_router(openai.router)
    app.include_router(openai.tokens_router)
    app.include_router(health.router)
    if settings.admin_enabled and settings.guard.enabled:
        app.include_router(admin.router)
        app.include_router(operations.router)
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        sessions = None
        if settings.console.enabled:
            max_age = round(settings.console.session_hours * 3600)
            sessions = ConsoleSessions(token, max_age_s=max_age)
            mount_console(app, sessions, cookie_secure=settings.console.cookie_secure)
        app.add_middleware(AdminAuthMiddleware, token=token, sessions=sessions)
    _register_error_handlers(app)
    _add_v1_gate(app, settings, metrics)
    app.add_middleware(DrainMiddleware, drain=drain)  # outside the /v1 gate: queued ones count
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    _add_metrics_auth(app, settings)
    app.add_middleware(RequestIdMiddleware)  # outermost: every log line of a request has its id
    return app


def _add_metrics_auth(app: FastAPI, settings: Settings) -> None:
    """/metrics: a bearer token, or its own port, or (development) open."""
    m = settings.metrics
    tokens = [t.get_secret_value() for t in (m.token, settings.admin_token) if t is not None]
    public = m.public or (not tokens and settings.admin_insecure_dev)
    app.add_middleware(
        MetricsAuthMiddleware, tokens=tokens, public=public, elsewhere=m.port is not None
    )


def _rate_limiter(settings: Settings, metrics: Metrics) -> Limiter | None:
    """Per-key buckets in this process, or in Redis for several replicas (server.shared_limits)."""
    lim = settings.limits
    if not lim.requests_per_minute:
        return None
    if lim.backend == "redis" and lim.redis_url is not None:
        from server.shared_limits import RedisLimiter

        return RedisLimiter(
            lim.redis_url.get_secret_value(),
            lim.requests_per_minute,
            on_fallback=metrics.shared_limit_fallbacks.inc,
        )
    return LocalLimiter(lim.requests_per_minute)


def _add_v1_gate(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """API keys, per-key rate limits and the admission queue in front of /v1 (server.limits)."""
    lim = settings.limits
    keys = [k.get_secret_value() for k in lim.api_keys]
    app.state.api_keys = api_keys = ApiKeys.load(keys, lim.api_keys_file)
    app.add_middleware(
        V1Gate,
        keys=api_keys,
        rate=_rate_limiter(settings, metrics),
        admission=AdmissionQueue(lim.max_concurrent_requests, lim.max_queued_requests),
        retry_after_s=lim.retry_after_s,
    )


async def _start_engine(app: FastAPI, engine: Engine, *, frozen: Gauge | None) -> None:
    """Start the engine; then, where the gateway owns its process (`frozen`: the gauge of
    frozen objects), freeze the heap it built (`server.heap`)."""
    try:
        await engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("The engine failed to start")
        app.state.engine_failure = f"{type(e).__name__}: {e}"
        return
    if frozen is not None:
        logger.info("%d objects of the startup heap frozen", freeze_heap(frozen))


def _register_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI envelope with the right status."""

    def respond(err: GatewayError) -> JSONResponse:
        return JSONResponse(error_body(err), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: Any) -> Response:
        return console_error(request, exc) or respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: Any) -> Response:
        message, param = validation_message(list(exc.errors()))
        err = InvalidRequestError(message, param=param)
        return console_error(request, err) or respond(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: Any) -> Response:
        if exc.status_code == 404:
            err: GatewayError = NotFoundError("No such route")
        elif exc.status_code == 413:
            err = PayloadTooLargeError(str(exc.detail), code="request_too_large")
        else:
            err = GatewayError(str(exc.detail))
            err.status_code = exc.status_code
            err.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return console_error(request, err) or respond(err)

    @app.exception_handler(DBAPIError)
    async def registry_unreachable(_: Request, exc: Any) -> JSONResponse:
        # Serving goes on with the targets already loaded; only registry reads/writes fail.
        logger.error("The target registry failed: %s", type(exc.orig).__name__)
        return respond(
            UnavailableError(
                "The target registry database cannot be reached, so this change cannot be "
                f"written ({type(exc.orig).__name__}: {str(exc.orig)[:200]}); requests are "
                "still served with the targets already loaded. Retry once the database is back.",
                code="registry_unavailable",
            )
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error")
        return respond(GatewayError("Internal error; see the gateway's log"))
