"""/admin/console: register a target from a form, the playground, and activity.

Registration goes through the same request model and conversion as `POST /admin/targets`
(`CreateTargetRequest`, `admin.new_target`), so the form accepts and refuses exactly what the API
does.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from server.console import views
from server.console.web import check_csrf, render
from server.errors import GatewayError, validation_message
from server.protocol.admin import ClassifyResponse, CreateTargetRequest
from server.protocol.common import ChatMessageParam
from server.protocol.operations import PlaygroundResponse
from server.routes.admin import TargetServiceDep, new_target
from server.routes.operations import ActivityDep, AuditTrailDep, PlaygroundDep, TargetNamesDep
from server.services.activity import describe_activity, describe_audit

PREFIX = "/admin/console"
router = APIRouter(prefix=PREFIX, include_in_schema=False, dependencies=[Depends(check_csrf)])
# Per-tenant scopes arrive with the OpenAI surface's tenant work; the form offers them once the
# API accepts them.
SCOPE_SUPPORTED = "scope" in CreateTargetRequest.model_fields
MODES = ("eco", "delta", "eco+delta")


# --- register -------------------------------------------------------------------------------


def _form_payload(form: dict[str, str]) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "name": form.get("name", ""),
        "description": form.get("description", ""),
        "aliases": views.parse_lines(form.get("aliases", "")),
        "forget_examples": views.parse_examples(form.get("forget_examples", "")),
        "retain_examples": views.parse_lines(form.get("retain_examples", "")),
        "mode": form.get("mode", "eco"),
    }
    if form.get("fpr", "").strip():
        payload["options"] = {"fpr": form["fpr"].strip()}
    tenants = views.parse_lines(form.get("tenants", "").replace(",", "\n"))
    api_keys = views.parse_lines(form.get("api_keys", "").replace(",", "\n"))
    if SCOPE_SUPPORTED and (tenants or api_keys):
        payload["scope"] = {"tenants": tenants, "api_keys": api_keys}
    return payload


def _register_page(
    request: Request, form: dict[str, str], error: str | None = None, status_code: int = 200
) -> Response:
    context = {
        "form": form,
        "error": error,
        "modes": MODES,
        "scope_supported": SCOPE_SUPPORTED,
        "separator": views.ANSWER_SEPARATOR,
        "active_page": "register",
    }
    return render(request, "register.html", context, status_code=status_code)


@router.get("/register", response_class=HTMLResponse)
async def register_page(request: Request) -> Response:
    return _register_page(request, {"mode": "eco", "fpr": "0.01"})


@router.post("/register", response_class=HTMLResponse)
async def register(request: Request, service: TargetServiceDep) -> Response:
    """Validate like the API, queue the job, and go watch it."""
    raw = await request.form()
    form = {k: str(v) for k, v in raw.items() if isinstance(v, str)}
    try:
        body = CreateTargetRequest.model_validate(_form_payload(form))
        job = await service.register(new_target(body))
    except ValidationError as e:
        message, _ = validation_message([dict(d) for d in e.errors()])
        return _register_page(request, form, message, status_code=400)
    except GatewayError as e:
        return _register_page(request, form, e.message, status_code=e.status_code)
    return RedirectResponse(f"{PREFIX}/jobs/{job.id}", status_code=303)


# --- playground -----------------------------------------------------------------------------


def _segments(result: ClassifyResponse) -> list[views.Segment]:
    spans = [(s.start, s.end, r.target) for r in result.results if r.flagged for s in r.spans]
    return views.highlight(result.text, spans)


@router.get("/playground", response_class=HTMLResponse)
async def playground_page(request: Request) -> Response:
    context = {"conversation": "", "max_tokens": 48, "active_page": "playground"}
    return render(request, "playground.html", context)


@router.post("/playground", response_class=HTMLResponse)
async def playground(
    request: Request,
    service: TargetServiceDep,
    playground: PlaygroundDep,
    conversation: Annotated[str, Form(max_length=100_000)] = "",
    max_tokens: Annotated[int, Form(ge=1, le=512)] = 48,
    action: Annotated[str, Form()] = "classify",
) -> Response:
    """Classify (dry run), or classify and answer twice: bare and guarded."""
    context: dict[str, Any] = {
        "conversation": conversation,
        "max_tokens": max_tokens,
        "active_page": "playground",
        "error": None,
        "result": None,
    }
    try:
        messages: list[ChatMessageParam] = views.parse_conversation(conversation)
        if not messages or not any(m["content"] for m in messages):
            raise ValueError("type a prompt or paste a conversation first")
    except ValueError as e:
        context["error"] = str(e)
        status = 400
    else:
        status = 200
        answers: PlaygroundResponse | None = None
        if action == "answer":
            answers = await playground.try_prompt(messages, max_tokens=max_tokens)
            classification = answers.classification
        else:
            classification = await service.dry_run(prompt=None, messages=messages)
        context["result"] = classification
        context["segments"] = _segments(classification)
        context["answers"] = answers
        context["turns"] = len(messages)
    template = "partials/playground_result.html" if request.headers.get("hx-request") else None
    return render(request, template or "playground.html", context, status_code=status)


# --- activity -------------------------------------------------------------------------------


CHART_WIDTH, CHART_HEIGHT = 360.0, 40.0


@router.get("/activity", response_class=HTMLResponse)
async def activity_page(
    request: Request,
    recorder: ActivityDep,
    trail: AuditTrailDep,
    names: TargetNamesDep,
    partial: str | None = None,
) -> Response:
    data = describe_activity(recorder, names)
    labels = [f"{views.when(p.start)} – {views.when(p.end)}" for p in data.series]
    passed = [p.passed for p in data.series]
    per_target = {
        t.target_id: [p.flagged.get(t.target_id, 0) for p in data.series] for t in data.targets
    }
    top = max([*passed, *(v for values in per_target.values() for v in values), 1])
    charts = {
        key: views.bars(values, labels, width=CHART_WIDTH, height=CHART_HEIGHT, top=top)
        for key, values in [("passed", passed), *per_target.items()]
    }
    context = {
        "data": data,
        "charts": charts,
        "chart_width": CHART_WIDTH,
        "chart_height": CHART_HEIGHT,
        "audit": describe_audit(trail, names, 50).data,
        "active_page": "activity",
    }
    template = "partials/activity_body.html" if partial else "activity.html"
    return render(request, template, context)
