"""/admin: forget targets, their jobs, and a dry-run classifier (bearer token, see auth.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.protocol.admin import (
    ClassifyRequest,
    ClassifyResponse,
    CreateTargetRequest,
    JobResponse,
    NewVersionRequest,
    RollbackRequest,
    TargetList,
    TargetResponse,
    UpdateTargetRequest,
    VersionList,
    VersionResponse,
)
from server.registry import JobRecord, VersionRecord
from server.services.targets import NewTarget, TargetService
from server.services.tenancy import SCOPE_OPTION, Caller, TenantScope, key_digest

router = APIRouter(prefix="/admin", tags=["admin"])


async def get_target_service(request: Request) -> TargetService:
    service: TargetService = request.app.state.targets
    return service


TargetServiceDep = Annotated[TargetService, Depends(get_target_service)]


def job_response(job: JobRecord) -> JobResponse:
    """A job record as the API shows it."""
    return JobResponse(**{k: getattr(job, k) for k in JobResponse.model_fields if k != "object"})


def new_target(body: CreateTargetRequest, name: str | None = None) -> NewTarget:
    """The service's view of a registration request (the API's and the console's)."""
    examples = [
        (e, None, ()) if isinstance(e, str) else (e.prompt, e.answer, tuple(e.wrong_answers))
        for e in body.forget_examples
    ]
    options = body.options.model_dump(exclude_none=True)
    if body.scope is not None:  # only key digests are stored
        scope = TenantScope.from_request(body.scope.api_keys, body.scope.tenants)
        if not scope.everyone:
            options[SCOPE_OPTION] = scope.to_option()
    return NewTarget(
        name=name or body.name,
        description=body.description,
        aliases=body.aliases,
        forget_examples=examples,
        retain_examples=body.retain_examples,
        mode=body.mode,
        options=options,
    )


def _accepted(job: JobRecord) -> Response:
    return JSONResponse(
        job_response(job).model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/admin/jobs/{job.id}"},
    )


@router.post("/targets", status_code=202, response_model=JobResponse)
async def create_target(body: CreateTargetRequest, service: TargetServiceDep) -> Response:
    """Register a forget target; answers 202 with the registration job."""
    return _accepted(await service.register(new_target(body)))


@router.put("/targets/{target_id}", status_code=202, response_model=JobResponse)
async def put_target(
    target_id: str, body: NewVersionRequest, service: TargetServiceDep
) -> Response:
    """Register the target's next version (202 + job); the active version stays until it is
    ready, and stays if it fails."""
    name = body.name or (await service.get_target(target_id)).name
    return _accepted(await service.new_version(target_id, new_target(body, name)))


@router.post("/targets/{target_id}/rollback", response_model=TargetResponse)
async def rollback_target(
    target_id: str, service: TargetServiceDep, body: RollbackRequest | None = None
) -> TargetResponse:
    """Activate an earlier version at once (default: the one before the active one)."""
    version = body.version if body is not None else None
    return service.describe(await service.rollback(target_id, version))


@router.get("/targets/{target_id}/versions", response_model=VersionList)
async def list_versions(target_id: str, service: TargetServiceDep) -> VersionList:
    """Every kept version of a target, oldest first."""
    record = await service.get_target(target_id)
    versions = await service.list_versions(target_id)
    return VersionList(data=[_version(v, record.active_version) for v in versions])


def _version(v: VersionRecord, active: int | None) -> VersionResponse:
    return VersionResponse(
        version=v.version,
        status=v.status,
        active=v.version == active,
        description=v.description,
        aliases=list(v.aliases),
        mode=v.mode,
        options=dict(v.options),
        calibration=dict(v.calibration) if v.calibration else None,
        error=v.error,
        job_id=v.job_id,
        n_forget_examples=len(v.forget_examples),
        n_retain_examples=len(v.retain_examples),
        created_at=v.created_at,
        activated_at=v.activated_at,
    )


@router.get("/jobs/{job_id}", response_model=JobResponse)
async def get_job(job_id: str, service: TargetServiceDep) -> JobResponse:
    """A registration job's progress and outcome."""
    return job_response(await service.get_job(job_id))


@router.get("/targets", response_model=TargetList)
async def list_targets(service: TargetServiceDep) -> TargetList:
    """Every target, active or not."""
    return TargetList(data=[service.describe(r) for r in await service.list_targets()])


@router.get("/targets/{target_id}", response_model=TargetResponse)
async def get_target(target_id: str, service: TargetServiceDep) -> TargetResponse:
    """One target: status, version, calibration figures."""
    return service.describe(await service.get_target(target_id))


@router.patch("/targets/{target_id}", response_model=TargetResponse)
async def update_target(
    target_id: str, body: UpdateTargetRequest, service: TargetServiceDep
) -> TargetResponse:
    """Enable, disable, or override the threshold (null restores the calibrated one)."""
    changes: dict[str, bool | float | None] = {}
    if "enabled" in body.model_fields_set and body.enabled is not None:
        changes["enabled"] = body.enabled
    if "threshold" in body.model_fields_set:
        changes["threshold_override"] = body.threshold
    return service.describe(await service.update_target(target_id, changes))


@router.delete("/targets/{target_id}", status_code=204)
async def delete_target(target_id: str, service: TargetServiceDep) -> Response:
    """Remove a target; the guard stops applying it at once."""
    await service.delete_target(target_id)
    return Response(status_code=204)


@router.post("/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest, service: TargetServiceDep, request: Request
) -> ClassifyResponse:
    """Dry run: each active target's score, threshold, decision and spans; nothing is sent.
    With `tenant` and/or `api_key`: as that caller's traffic (tenant-scoped targets)."""
    messages = [m.to_param() for m in body.messages] if body.messages is not None else None
    caller = None
    if body.tenant is not None or body.api_key is not None:
        digest = key_digest(body.api_key) if body.api_key is not None else None
        tenant = body.tenant
        if tenant is None and body.api_key is not None:
            tenant = request.app.state.api_keys.tenant_of(body.api_key)
        caller = Caller(key_digest=digest, tenant=tenant)
    return await service.dry_run(prompt=body.prompt, messages=messages, caller=caller)
