"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.deps import EngineDep, MetricsDep
from server.errors import UnavailableError

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request) -> Response:
    """Liveness: the process serves HTTP and its engine has not failed."""
    failure = getattr(request.app.state, "engine_failure", None)
    if failure is not None:
        raise UnavailableError(f"The engine failed to start: {failure}")
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request, engine: EngineDep) -> Response:
    """Readiness: the engine is loaded and accepts requests."""
    if getattr(request.app.state, "draining", False):
        raise UnavailableError("The server is shutting down")
    if not engine.ready:
        failure = getattr(request.app.state, "engine_failure", None)
        raise UnavailableError(
            f"The engine failed to start: {failure}" if failure else "The engine is loading"
        )
    return JSONResponse({"status": "ready", "model": engine.model.id})


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus exposition."""
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
