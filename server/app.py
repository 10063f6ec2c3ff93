"""The app factory: settings in, FastAPI app out; the lifespan owns the engine and services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.auth import AdminAuthMiddleware, ApiKeys
from server.deps import build_engine, build_guard, local_model_dir
from server.engine import Engine
from server.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
    error_body,
    validation_message,
)
from server.limits import AdmissionQueue, RateLimiter, V1Gate
from server.logs import RequestIdMiddleware
from server.metrics import Metrics, MetricsMiddleware
from server.registry import Registry
from server.routes import admin, health, openai
from server.services.failsafe import FailSafeGuard
from server.services.generation import GenerationService, PassthroughGuard, PromptGuard
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is None:
            chosen, model_dir = await asyncio.to_thread(build_engine, settings)
        else:
            # An injected engine brings no model folder unless the settings name one.
            chosen, model_dir = engine, (local_model_dir(settings) if settings.model else None)
        app.state.engine = chosen
        guard: PromptGuard = PassthroughGuard()
        targets: TargetService | None = None
        registry: Registry | None = None
        if settings.guard.enabled:
            registry = await asyncio.to_thread(Registry, settings.registry_location())
            eco, targets = await asyncio.to_thread(
                build_guard, settings, chosen, model_dir, registry, metrics
            )
            guard = FailSafeGuard(
                eco, eco.corruptor, metrics, fail_closed=settings.guard.fail_closed
            )
        lim = settings.limits
        request_limits = RequestLimits(
            lim.max_prompt_chars, lim.max_prompt_tokens, lim.max_tokens, lim.max_n
        )
        app.state.generation = generation = GenerationService(
            chosen, guard, metrics, request_limits
        )
        app.state.responses = ResponsesService(generation)
        app.state.targets = targets
        app.state.engine_failure = None
        app.state.draining = False
        starter = asyncio.create_task(_start_engine(app, chosen))
        poller: RegistryPoller | None = None
        if targets is not None and registry is not None:
            seen = await asyncio.to_thread(registry.revision)
            await targets.start()
            if settings.registry_poll_interval > 0:
                # Other gateways on the same registry: their changes reach this one by polling.
                poller = RegistryPoller(
                    registry, targets.sync, interval_s=settings.registry_poll_interval
                )
                poller.start(seen)
        try:
            yield
        finally:
            app.state.draining = True
            starter.cancel()
            if poller is not None:
                await poller.stop()
            if targets is not None:
                await targets.stop()
            await chosen.stop()
            if registry is not None:
                registry.close()

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
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        app.add_middleware(AdminAuthMiddleware, token=token)
    _register_error_handlers(app)
    _add_v1_gate(app, settings)
    app.add_middleware(DrainMiddleware, drain=drain)  # outside the /v1 gate: queued ones count
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every log line of a request has its id
    return app


def _add_v1_gate(app: FastAPI, settings: Settings) -> None:
    """API keys, per-key rate limits and the admission queue in front of /v1 (server.limits)."""
    lim = settings.limits
    keys = [k.get_secret_value() for k in lim.api_keys]
    app.state.api_keys = api_keys = ApiKeys.load(keys, lim.api_keys_file)
    app.add_middleware(
        V1Gate,
        keys=api_keys,
        rate=RateLimiter(lim.requests_per_minute) if lim.requests_per_minute else None,
        admission=AdmissionQueue(lim.max_concurrent_requests, lim.max_queued_requests),
        retry_after_s=lim.retry_after_s,
    )


async def _start_engine(app: FastAPI, engine: Engine) -> None:
    try:
        await engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("The engine failed to start")
        app.state.engine_failure = f"{type(e).__name__}: {e}"


def _register_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI envelope with the right status."""

    def respond(err: GatewayError) -> JSONResponse:
        return JSONResponse(error_body(err), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: Any) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: Any) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return respond(InvalidRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: Any) -> JSONResponse:
        if exc.status_code == 404:
            return respond(NotFoundError("No such route"))
        err = GatewayError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return respond(err)

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
