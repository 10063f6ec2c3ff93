"""/v1: chat completions, completions, models."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from server.deps import GenerationServiceDep, RequestIdDep
from server.protocol.chat import ChatCompletionRequest
from server.protocol.common import dump
from server.protocol.completion import CompletionRequest
from server.routes.cancel import run_cancellable

router = APIRouter(prefix="/v1", tags=["openai"])


def _respond(result: BaseModel | AsyncIterator[str], request_id: str) -> Response:
    headers = {"X-Request-Id": request_id}
    if isinstance(result, BaseModel):
        return JSONResponse(dump(result), headers=headers)
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)


@router.post("/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: GenerationServiceDep, rid: RequestIdDep
) -> Response:
    """OpenAI chat completions, guarded."""
    result = await run_cancellable(request, service.create_chat_completion(body, rid))
    return _respond(result, rid)


@router.post("/completions")
async def create_completion(
    body: CompletionRequest, request: Request, service: GenerationServiceDep, rid: RequestIdDep
) -> Response:
    """OpenAI (legacy) completions, guarded."""
    result = await run_cancellable(request, service.create_completion(body, rid))
    return _respond(result, rid)


@router.get("/models")
async def list_models(service: GenerationServiceDep) -> Response:
    """The served model."""
    return JSONResponse(dump(service.list_models()))
