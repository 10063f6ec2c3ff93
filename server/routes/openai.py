"""/v1: chat completions, completions, responses, models; /tokenize and /detokenize."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from server.deps import CallDep, CallerDep, GenerationServiceDep
from server.protocol.chat import ChatCompletionRequest
from server.protocol.common import dump
from server.protocol.completion import CompletionRequest
from server.protocol.responses import ResponsesRequest
from server.protocol.tokenize import DetokenizeRequest, TokenizeRequest
from server.routes.cancel import run_cancellable
from server.services.tenancy import Caller
from server.services.tokenization import detokenize, tokenize

router = APIRouter(prefix="/v1", tags=["openai"])
tokens_router = APIRouter(tags=["tokenize"])


def _respond(result: BaseModel | AsyncIterator[str], request_id: str) -> Response:
    headers = {"X-Request-Id": request_id}
    if isinstance(result, BaseModel):
        return JSONResponse(dump(result), headers=headers)
    return StreamingResponse(result, media_type="text/event-stream", headers=headers)


def _as(caller: Caller, *users: str | None) -> Caller:
    """The caller with the request's own end-user id (audit log only)."""
    end_user = next((u for u in users if u), None)
    return replace(caller, end_user=end_user) if end_user else caller


@router.post("/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    call: CallDep,
) -> Response:
    """OpenAI chat completions, guarded."""
    who = _as(call.caller, body.safety_identifier, body.user)
    result = await run_cancellable(
        request, call.generation.create_chat_completion(body, call.request_id, who)
    )
    return _respond(result, call.request_id)


@router.post("/completions")
async def create_completion(
    body: CompletionRequest,
    request: Request,
    call: CallDep,
) -> Response:
    """OpenAI (legacy) completions, guarded."""
    who = _as(call.caller, body.user)
    result = await run_cancellable(
        request, call.generation.create_completion(body, call.request_id, who)
    )
    return _respond(result, call.request_id)


@router.post("/responses")
async def create_response(
    body: ResponsesRequest,
    request: Request,
    call: CallDep,
) -> Response:
    """OpenAI Responses, guarded exactly like chat (nothing is stored: `store` must be false)."""
    who = _as(call.caller, body.safety_identifier, body.user)
    result = await run_cancellable(
        request, call.responses.create_response(body, call.request_id, who)
    )
    return _respond(result, call.request_id)


@router.get("/models")
async def list_models(service: GenerationServiceDep) -> Response:
    """The served model."""
    return JSONResponse(dump(service.list_models()))


@tokens_router.post("/tokenize")
async def tokenize_route(
    body: TokenizeRequest, service: GenerationServiceDep, caller: CallerDep
) -> Response:
    """Token ids of a prompt or a conversation, as the engine reads them (vLLM's /tokenize)."""
    return JSONResponse(dump(await tokenize(service, body)))


@tokens_router.post("/detokenize")
async def detokenize_route(
    body: DetokenizeRequest, service: GenerationServiceDep, caller: CallerDep
) -> Response:
    """Text of token ids (vLLM's /detokenize)."""
    return JSONResponse(dump(await detokenize(service, body)))
