"""/admin/console: login, targets (status, figures, enable/disable, threshold, delete), jobs.

Thin handlers over `TargetService`, rendering server-side templates (server/console). Every
non-GET handler runs after `check_csrf` (router dependency); auth.AdminAuthMiddleware has already
checked the session cookie or the bearer header.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from server.console import views
from server.console.session import COOKIE_NAME, ConsoleSessions
from server.console.web import (
    STATIC_DIR,
    Console,
    ConsoleDep,
    build_templates,
    check_csrf,
    render,
)
from server.errors import GatewayError
from server.protocol.admin import TargetResponse
from server.routes import console_tools
from server.routes.admin import TargetServiceDep, job_response
from server.services.targets import TargetService

PREFIX = "/admin/console"
router = APIRouter(prefix=PREFIX, include_in_schema=False, dependencies=[Depends(check_csrf)])


def mount_console(app: FastAPI, sessions: ConsoleSessions, *, cookie_secure: bool | None) -> None:
    """Serve the console on `app` (its routes, its static files, its collaborators)."""
    app.state.console = Console(
        sessions=sessions,
        templates=build_templates(),
        cookie_secure=cookie_secure,
        login_required=not sessions.open,
    )
    app.include_router(router)
    app.include_router(console_tools.router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC_DIR), name="console-static")


def console_error(request: Request, err: GatewayError) -> Response | None:
    """An error page for a person using the console; None for API calls (they get JSON)."""
    path = request.url.path
    if not (path == PREFIX or path.startswith(PREFIX + "/")) or request.headers.get("hx-request"):
        return None
    if getattr(request.app.state, "console", None) is None or path.startswith(PREFIX + "/static"):
        return None
    context = {"status": err.status_code, "title": err.error_type, "message": err.message}
    return render(request, "error.html", context, status_code=err.status_code)


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def _safe_next(value: str | None) -> str:
    """Only console paths: a login link must not send the operator to another site."""
    if value and value.startswith(PREFIX) and "//" not in value and "\\" not in value:
        return value
    return f"{PREFIX}/targets"


# --- login ----------------------------------------------------------------------------------


@router.get("")
async def home() -> RedirectResponse:
    return _see_other(f"{PREFIX}/targets")


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, console: ConsoleDep, next: str | None = None) -> Response:
    if not console.login_required:
        return _see_other(_safe_next(next))
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    console: ConsoleDep,
    token: Annotated[str, Form(max_length=4096)] = "",
    next: Annotated[str | None, Form()] = None,
) -> Response:
    """Check the admin token once; the browser then holds only a signed session cookie."""
    if not console.sessions.check_token(token):
        return render(
            request,
            "login.html",
            {"next": _safe_next(next), "error": "That is not the admin token."},
            status_code=401,
        )
    response = _see_other(_safe_next(next))
    secure = console.cookie_secure
    response.set_cookie(
        COOKIE_NAME,
        console.sessions.issue(),
        max_age=console.sessions.max_age_s,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" if secure is None else secure,
    )
    return response


@router.post("/logout")
async def logout() -> RedirectResponse:
    response = _see_other(f"{PREFIX}/login")
    response.delete_cookie(COOKIE_NAME, path=PREFIX, httponly=True, samesite="strict")
    return response


# --- targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    t: TargetResponse
    f: views.Figures


def row(target: TargetResponse) -> Row:
    return Row(target, views.figures(target.calibration))


@router.get("/targets", response_class=HTMLResponse)
async def targets_page(
    request: Request, service: TargetServiceDep, partial: str | None = None, deleted: str = ""
) -> Response:
    rows = [row(service.describe(r)) for r in await service.list_targets()]
    busy = any(r.t.status in ("pending", "training") for r in rows)
    context = {"rows": rows, "busy": busy, "deleted": deleted[:200], "active_page": "targets"}
    if partial == "rows":
        return render(request, "partials/target_rows.html", context)
    return render(request, "targets.html", context)


@router.get("/targets/{target_id}", response_class=HTMLResponse)
async def target_page(request: Request, target_id: str, service: TargetServiceDep) -> Response:
    target = service.describe(await service.get_target(target_id))
    jobs = [job_response(j) for j in await service.list_jobs(target_id, 20)]
    context = {"row": row(target), "t": target, "jobs": jobs, "active_page": "targets"}
    return render(request, "target.html", context)


@router.post("/targets/{target_id}/enabled", response_class=HTMLResponse)
async def set_enabled(
    request: Request,
    target_id: str,
    service: TargetServiceDep,
    enabled: Annotated[bool, Form()],
    back: Annotated[str | None, Form()] = None,
) -> Response:
    """Enable or disable: the guard follows at once."""
    record = await service.update_target(target_id, {"enabled": enabled})
    if _is_htmx(request) and back is None:
        return render(request, "partials/target_row.html", {"row": row(service.describe(record))})
    return _see_other(_safe_next(back))


@router.post("/targets/{target_id}/threshold")
async def set_threshold(
    target_id: str,
    service: TargetServiceDep,
    threshold: Annotated[float | None, Form(gt=0, lt=1)] = None,
    restore: Annotated[str | None, Form()] = None,
) -> RedirectResponse:
    """Override the calibrated threshold, or restore it."""
    value = None if restore else threshold
    await service.update_target(target_id, {"threshold_override": value})
    return _see_other(f"{PREFIX}/targets/{target_id}")


@router.get("/targets/{target_id}/delete", response_class=HTMLResponse)
async def confirm_delete(request: Request, target_id: str, service: TargetServiceDep) -> Response:
    target = service.describe(await service.get_target(target_id))
    return render(request, "delete.html", {"t": target, "active_page": "targets"})


@router.post("/targets/{target_id}/delete")
async def delete(target_id: str, service: TargetServiceDep) -> RedirectResponse:
    name = (await service.get_target(target_id)).name
    await service.delete_target(target_id)
    return _see_other(f"{PREFIX}/targets?deleted={quote(name)}")


# --- jobs -----------------------------------------------------------------------------------


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, service: TargetServiceDep) -> Response:
    names = {t.id: t.name for t in await service.list_targets()}
    jobs = [job_response(j) for j in await service.list_jobs(None, 100)]
    context = {"jobs": jobs, "names": names, "active_page": "jobs"}
    return render(request, "jobs.html", context)


async def _job_context(job_id: str, service: TargetService) -> dict[str, object]:
    job = job_response(await service.get_job(job_id))
    target = service.describe(await service.get_target(job.target_id))
    finished = job.status in ("succeeded", "failed")
    now = datetime.now(UTC)
    return {
        "job": job,
        "t": target,
        "stages": views.job_stages(target.mode, job.stage, job.status),
        "finished": finished,
        "elapsed": (
            (views.utc(job.updated_at) if finished else now) - views.utc(job.created_at)
        ).total_seconds(),
        "in_stage": (now - views.utc(job.updated_at)).total_seconds(),
        "active_page": "jobs",
    }


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, service: TargetServiceDep) -> Response:
    return render(request, "job.html", await _job_context(job_id, service))


@router.get("/jobs/{job_id}/status", response_class=HTMLResponse)
async def job_status(request: Request, job_id: str, service: TargetServiceDep) -> Response:
    """The live part of the job page; it stops polling itself once the job has ended."""
    return render(request, "partials/job_status.html", await _job_context(job_id, service))
