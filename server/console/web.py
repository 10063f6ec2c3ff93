"""What every console page shares: templates, the session, the CSRF check, security headers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from server.console import views
from server.console.session import (
    COOKIE_NAME,
    CSRF_FIELD,
    CSRF_HEADER,
    ConsoleSession,
    ConsoleSessions,
)
from server.errors import PermissionDeniedError

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Everything the pages load comes from the gateway itself: no inline script, no inline style.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def build_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.filters.update(views.FILTERS)
    return templates


@dataclass(frozen=True)
class Console:
    """The console's collaborators, kept on `app.state.console`."""

    sessions: ConsoleSessions
    templates: Jinja2Templates
    cookie_secure: bool | None
    """None: Secure when the request came over https."""
    login_required: bool
    """False only in the insecure development mode (no admin token at all)."""


def get_console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def console_dep(request: Request) -> Console:
    """get_console as a dependency (async: FastAPI runs a plain function on a worker thread)."""
    return get_console(request)


ConsoleDep = Annotated[Console, Depends(console_dep)]


def admin_auth(request: Request) -> str:
    """How auth.AdminAuthMiddleware let this request in: bearer, session or open."""
    state = request.scope.get("state") or {}
    return str(state.get("admin_auth", ""))


def current_session(request: Request) -> ConsoleSession | None:
    return get_console(request).sessions.verify(request.cookies.get(COOKIE_NAME))


async def check_csrf(request: Request) -> None:
    """State-changing console requests must come from the console's own pages.

    A request let in by the session cookie must carry the session's CSRF token (form field or
    `X-CSRF-Token`, which htmx sends); any browser request must be same-origin. Requests with the
    bearer header carry no ambient credential, so they need neither.
    """
    if request.method in SAFE_METHODS or admin_auth(request) == "bearer":
        return
    origin = request.headers.get("origin")
    same = f"{request.url.scheme}://{request.url.netloc}"
    if request.headers.get("sec-fetch-site") == "cross-site" or (origin and origin != same):
        raise PermissionDeniedError("Cross-site request refused by the console", code="csrf_failed")
    if admin_auth(request) != "session":
        return
    session = current_session(request)
    given = request.headers.get(CSRF_HEADER)
    if given is None:
        given = str((await request.form()).get(CSRF_FIELD) or "")
    if session is None or not get_console(request).sessions.check_csrf(session, given):
        raise PermissionDeniedError(
            "Missing or stale CSRF token: reload the console page and try again",
            code="csrf_failed",
        )


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, *, status_code: int = 200
) -> HTMLResponse:
    """A template with the page's common context (session, CSRF token) and security headers."""
    console = get_console(request)
    session = current_session(request)
    page = {
        "csrf_token": console.sessions.csrf_token(session) if session else "",
        "csrf_field": CSRF_FIELD,
        "logged_in": session is not None,
        "login_required": console.login_required,
        **(context or {}),
    }
    response = console.templates.TemplateResponse(
        request, name, page, status_code=status_code, headers=SECURITY_HEADERS
    )
    return response
