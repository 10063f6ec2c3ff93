"""/admin for operators: job lists, the playground, activity counters and the audit trail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from server.protocol.common import ChatMessageParam
from server.protocol.operations import (
    ActivityResponse,
    AuditList,
    JobList,
    PlaygroundRequest,
    PlaygroundResponse,
)
from server.routes.admin import TargetServiceDep, job_response
from server.services.activity import (
    ActivityRecorder,
    AuditTrail,
    describe_activity,
    describe_audit,
)
from server.services.playground import PlaygroundService

router = APIRouter(prefix="/admin", tags=["admin"])


async def get_playground(request: Request) -> PlaygroundService:
    service: PlaygroundService = request.app.state.playground
    return service


async def get_activity(request: Request) -> ActivityRecorder:
    recorder: ActivityRecorder = request.app.state.activity
    return recorder


async def get_audit_trail(request: Request) -> AuditTrail:
    trail: AuditTrail = request.app.state.audit_trail
    return trail


PlaygroundDep = Annotated[PlaygroundService, Depends(get_playground)]
ActivityDep = Annotated[ActivityRecorder, Depends(get_activity)]
AuditTrailDep = Annotated[AuditTrail, Depends(get_audit_trail)]


async def target_names(service: TargetServiceDep) -> dict[str, str]:
    """Target id -> name, for labelling counters and audit entries."""
    return {t.id: t.name for t in await service.list_targets()}


TargetNamesDep = Annotated[dict[str, str], Depends(target_names)]


@router.get("/jobs", response_model=JobList)
async def list_jobs(
    service: TargetServiceDep,
    target_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    """Registration jobs, newest first (all, or one target's)."""
    return JobList(data=[job_response(j) for j in await service.list_jobs(target_id, limit)])


def playground_messages(body: PlaygroundRequest) -> list[ChatMessageParam]:
    """A bare prompt is one user turn."""
    if body.messages is not None:
        return [m.to_param() for m in body.messages]
    return [{"role": "user", "content": body.prompt or ""}]


@router.post("/playground", response_model=PlaygroundResponse)
async def playground(body: PlaygroundRequest, service: PlaygroundDep) -> PlaygroundResponse:
    """The guard's verdict on a prompt or conversation, and the bare and guarded answers."""
    return await service.try_prompt(playground_messages(body), max_tokens=body.max_tokens)


@router.get("/activity", response_model=ActivityResponse)
async def activity(recorder: ActivityDep, names: TargetNamesDep) -> ActivityResponse:
    """This gateway's guard decisions per target over time (its own counters, as /metrics)."""
    return describe_activity(recorder, names)


@router.get("/audit", response_model=AuditList)
async def audit(
    trail: AuditTrailDep,
    names: TargetNamesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditList:
    """The newest flagged decisions this gateway logged (ids and scores, never prompt text)."""
    return describe_audit(trail, names, limit)
