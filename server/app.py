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
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine import Engine
from server.engine.openai_upstream import OpenAIUpstreamEngine, UpstreamConfig
from server.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    error_body,
    validation_message,
)
from server.metrics import Metrics, MetricsMiddleware
from server.routes import health, openai
from server.services.generation import GenerationService, PassthroughGuard, PromptGuard
from server.settings import Settings

logger = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    """The engine the settings ask for (not started)."""
    if settings.engine == "openai_upstream":
        up = settings.upstream
        assert up.url is not None  # checked by Settings
        return OpenAIUpstreamEngine(
            UpstreamConfig(
                base_url=up.url,
                api_key=up.api_key.get_secret_value() if up.api_key else None,
                model=up.model,
                served_model_name=settings.served_model_name,
                connect_timeout_s=up.connect_timeout_s,
                read_timeout_s=up.read_timeout_s,
                max_connections=up.max_connections,
            )
        )
    from server.engine.vllm_local import VllmEngineConfig, VllmLocalEngine
    from server.modelstore import resolve_model

    path = resolve_model(settings.model, settings.model_cache_dir, auto_pull=settings.auto_pull)
    v = settings.vllm
    return VllmLocalEngine(
        VllmEngineConfig(
            model_path=path,
            served_model_name=settings.served_model_name or path.name,
            dtype=v.dtype,
            max_model_len=v.max_model_len,
            kv_cache_gib=v.kv_cache_gib,
            enforce_eager=v.enforce_eager,
            device=v.device,
            gpu_memory_utilization=v.gpu_memory_utilization,
            tensor_parallel_size=v.tensor_parallel_size,
            max_num_seqs=v.max_num_seqs,
            max_logprobs=v.max_logprobs,
            seed=v.seed,
        )
    )


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    guard: PromptGuard | None = None,
) -> FastAPI:
    """Build the gateway. `engine` replaces the one the settings describe (tests, embedding)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        chosen = engine if engine is not None else await asyncio.to_thread(build_engine, settings)
        app.state.engine = chosen
        metrics.watch_engine(lambda: chosen.running)
        app.state.generation = GenerationService(chosen, guard or PassthroughGuard(), metrics)
        app.state.engine_failure = None
        app.state.draining = False
        starter = asyncio.create_task(_start_engine(app, chosen))
        try:
            yield
        finally:
            app.state.draining = True
            starter.cancel()
            await chosen.stop()

    app = FastAPI(
        title="obliviate",
        summary="OpenAI-compatible gateway that makes a served LLM forget registered targets.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(openai.router)
    app.include_router(health.router)
    _register_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


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

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error")
        return respond(GatewayError("Internal error; see the gateway's log"))
