"""Who gets into /admin: default deny everywhere but the console's login page and static files;
the console's session cookie opens the console only; its state-changing requests need the
session's CSRF token and the same origin.

These apps run without their lifespan (no engine, no registry): only routing and the middleware
are exercised, so each test takes milliseconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route

from server.app import create_app
from server.auth import AdminAuthMiddleware
from server.console.session import COOKIE_NAME, ConsoleSessions
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OPEN_PATHS = {"/admin/console/login"}


def _app(tmp_path: Path, **settings: Any) -> Any:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "model_cache_dir": tmp_path / "models",
        "admin_token": ADMIN_TOKEN,
    }
    return create_app(Settings(**{**base, **settings}), engine=FakeEngine())


@pytest.fixture
def app(tmp_path: Path) -> Any:
    return _app(tmp_path)


@pytest.fixture
def client(app: Any) -> TestClient:
    return TestClient(app, follow_redirects=False)


def login(client: TestClient) -> str:
    """Log in through the form; the CSRF token the console's pages carry."""
    response = client.post("/admin/console/login", data={"token": ADMIN_TOKEN})
    assert response.status_code == 303, response.text
    return csrf_of(client)


def csrf_of(client: TestClient) -> str:
    session = client.app.state.console.sessions.verify(client.cookies.get(COOKIE_NAME))  # type: ignore[attr-defined]
    assert session is not None
    token: str = client.app.state.console.sessions.csrf_token(session)  # type: ignore[attr-defined]
    return token


def admin_routes(app: Any) -> list[tuple[str, str]]:
    """(method, concrete path) of every /admin route the app serves, API and console."""
    found = []
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/admin"):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    found.append((method, path))
        elif isinstance(route, Mount) and route.path.startswith("/admin"):
            found.append(("GET", f"{route.path}/console.css"))
    return found


def test_every_admin_path_but_login_and_static_needs_credentials(
    app: Any, client: TestClient
) -> None:
    routes = admin_routes(app)
    assert ("GET", "/admin/console/targets") in routes and ("POST", "/admin/targets") in routes
    extra = [("GET", "/admin"), ("GET", "/admin/nowhere"), ("GET", "/admin/console/nowhere")]
    for method, path in [*routes, *extra]:
        response = client.request(method, path)
        if path in OPEN_PATHS or path.startswith("/admin/console/static/"):
            # Served by the console itself (an empty login is refused by the form, in HTML).
            assert "www-authenticate" not in response.headers, (method, path)
            assert response.headers["content-type"].startswith(("text/", "application/javascript"))
            continue
        console_page = path.startswith("/admin/console") and method == "GET"
        if console_page:  # a browser is sent to the login form, and nothing is served
            assert response.status_code == 303, (method, path)
            assert response.headers["location"].startswith("/admin/console/login?next=")
        else:
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "invalid_admin_token"


def test_the_session_cookie_opens_the_console_and_nothing_else(client: TestClient) -> None:
    login(client)
    assert client.get("/admin/console/register").status_code == 200
    for method, path in [("GET", "/admin/targets"), ("POST", "/admin/targets"),
                         ("GET", "/admin/jobs"), ("POST", "/admin/playground")]:  # fmt: skip
        assert client.request(method, path).status_code == 401, path


async def _call(middleware: AdminAuthMiddleware, path: str, cookie: str = "") -> int:
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        sent.append({"type": "reached"})

    middleware.app = app
    headers = [(b"cookie", cookie.encode())] if cookie else []
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    await middleware(scope, receive, send)
    if sent[0]["type"] == "reached":
        return 200
    return int(sent[0]["status"])


@pytest.mark.parametrize(
    "path",
    [
        "/admin/console/static/../targets",
        "/admin/console/static/./../../admin/targets",
        "/admin/console/static//etc",
        "/admin/console/static/",
        "/admin/console/login/../targets",
        "/admin/console/loginx",
        "/admin/console/static/..",
    ],
)
async def test_tricky_paths_are_not_taken_for_the_open_ones(path: str) -> None:
    """The raw ASGI path, as a client can send it (HTTP clients normalise dot segments)."""
    middleware = AdminAuthMiddleware(None, ADMIN_TOKEN, ConsoleSessions(ADMIN_TOKEN, max_age_s=60))  # type: ignore[arg-type]
    assert await _call(middleware, path) in (303, 401), path
    assert await _call(middleware, "/admin/console/static/console.css") == 200


async def test_forged_expired_and_foreign_cookies_are_sent_to_the_login() -> None:
    sessions = ConsoleSessions(ADMIN_TOKEN, max_age_s=60)
    middleware = AdminAuthMiddleware(None, ADMIN_TOKEN, sessions)  # type: ignore[arg-type]
    good = sessions.issue()
    assert await _call(middleware, "/admin/console/targets", f"{COOKIE_NAME}={good}") == 200
    expired = sessions.issue(now=0.0)
    foreign = ConsoleSessions("another-token-0123456789", max_age_s=60).issue()
    for cookie in (expired, foreign, good[:-2], "garbage"):
        status = await _call(middleware, "/admin/console/targets", f"{COOKIE_NAME}={cookie}")
        assert status == 303, cookie
    # Without the console (sessions=None) a cookie opens nothing at all.
    closed = AdminAuthMiddleware(None, ADMIN_TOKEN, None)  # type: ignore[arg-type]
    assert await _call(closed, "/admin/console/targets", f"{COOKIE_NAME}={good}") == 401
    assert await _call(closed, "/admin/console/login") == 401


def test_login_sets_a_strict_httponly_cookie_and_never_shows_the_token(
    client: TestClient,
) -> None:
    wrong = client.post("/admin/console/login", data={"token": "not-it"})
    assert wrong.status_code == 401 and "not the admin token" in wrong.text
    assert COOKIE_NAME not in wrong.headers.get("set-cookie", "")
    ok = client.post(
        "/admin/console/login", data={"token": ADMIN_TOKEN, "next": "/admin/console/playground"}
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/admin/console/playground"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin/console" in cookie
    assert "Secure" not in cookie  # plain http here
    assert ADMIN_TOKEN not in cookie and ADMIN_TOKEN not in ok.headers["location"]
    page = client.get("/admin/console/register")
    assert ADMIN_TOKEN not in page.text
    https = TestClient(client.app, base_url="https://testserver", follow_redirects=False)
    assert (
        "Secure"
        in https.post("/admin/console/login", data={"token": ADMIN_TOKEN}).headers["set-cookie"]
    )


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/v1/models"])
def test_login_never_sends_the_operator_off_the_console(client: TestClient, target: str) -> None:
    response = client.post("/admin/console/login", data={"token": ADMIN_TOKEN, "next": target})
    assert response.headers["location"] == "/admin/console/targets"


def test_state_changing_requests_need_the_csrf_token_and_the_same_origin(
    client: TestClient,
) -> None:
    csrf = login(client)
    assert client.post("/admin/console/logout").status_code == 403
    assert client.post("/admin/console/logout", data={"csrf_token": "wrong"}).status_code == 403
    cross = client.post(
        "/admin/console/logout",
        data={"csrf_token": csrf},
        headers={"Origin": "https://evil.example"},
    )
    assert cross.status_code == 403
    fetched = client.post(
        "/admin/console/logout", headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}
    )
    assert fetched.status_code == 403
    assert fetched.headers["content-type"].startswith("text/html")  # a page for a person
    ok = client.post(
        "/admin/console/logout",
        headers={"X-CSRF-Token": csrf, "Origin": "http://testserver"},
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/admin/console/login"
    assert f'{COOKIE_NAME}=""' in ok.headers["set-cookie"]


def test_the_bearer_header_needs_no_csrf_token(client: TestClient) -> None:
    response = client.post("/admin/console/logout", headers=AUTH)
    assert response.status_code == 303


def test_insecure_dev_mode_needs_no_login(tmp_path: Path) -> None:
    app = _app(tmp_path, admin_token=None, admin_insecure_dev=True)
    client = TestClient(app, follow_redirects=False)
    response = client.get("/admin/console/login")
    assert response.status_code == 303 and response.headers["location"] == "/admin/console/targets"


def test_without_the_console_its_paths_are_closed_like_any_other(tmp_path: Path) -> None:
    client = TestClient(_app(tmp_path, console={"enabled": False}), follow_redirects=False)
    assert client.get("/admin/console/login").status_code == 401
    assert client.get("/admin/console/static/htmx.min.js").status_code == 401
    assert client.get("/admin/console/login", headers=AUTH).status_code == 404
