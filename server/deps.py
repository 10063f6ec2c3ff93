"""FastAPI dependencies: typed aliases for what the lifespan put on `app.state`."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request

from server.engine import Engine
from server.metrics import Metrics
from server.services.generation import GenerationService


def get_generation_service(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.generation
    return service


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_request_id(request: Request) -> str:
    """The client's X-Request-Id when it sent a sane one, else a fresh id."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.replace("-", "").replace("_", "").isalnum():
        return given
    return uuid.uuid4().hex


GenerationServiceDep = Annotated[GenerationService, Depends(get_generation_service)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
