"""Admin authentication: pure ASGI, default-deny on /admin, hashed constant-time compare."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from urllib.parse import quote

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from server.console.session import COOKIE_NAME, ConsoleSessions
from server.errors import AuthenticationError, error_body
from server.services.tenancy import Caller

ADMIN_PREFIX = "/admin"
CONSOLE_PREFIX = "/admin/console"
CONSOLE_LOGIN = CONSOLE_PREFIX + "/login"
# The only /admin paths open without a token: the login form and the console's static files
# (plain names, no dot segments or doubled slashes).
_CONSOLE_STATIC = re.compile(r"/admin/console/static/[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class AdminAuthMiddleware:
    """Every /admin request needs `Authorization: Bearer <token>`; nothing else is touched.

    Only the token's sha256 is kept, and digests are compared in constant time, so neither the
    token nor its length leaks through memory dumps or timing. `token=None` means the operator
    explicitly chose the insecure development mode.

    With `sessions` (the web console on), /admin/console also takes a console session cookie
    instead of the header, its login page and static files need neither, and a browser without a
    session is sent to the login page. The cookie opens nothing outside /admin/console. How the
    request was let in is left in `scope["state"]["admin_auth"]` (`bearer`, `session`, `open`)
    for the console's CSRF check.
    """

    def __init__(
        self, app: ASGIApp, token: str | None, sessions: ConsoleSessions | None = None
    ) -> None:
        self.app = app
        self._digest = _digest(token) if token is not None else None
        self._sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (
            path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        ):
            await self.app(scope, receive, send)
            return
        if self._digest is None:
            await self._let_in(scope, receive, send, "open")
            return
        headers = dict(scope.get("headers", []))
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._digest):
            await self._let_in(scope, receive, send, "bearer")
            return
        console = self._sessions is not None and (
            path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")
        )
        if console and (path == CONSOLE_LOGIN or _CONSOLE_STATIC.fullmatch(path)):
            await self._let_in(scope, receive, send, "open")
            return
        if console and self._sessions is not None:
            cookies = cookie_parser(headers.get(b"cookie", b"").decode("latin-1"))
            if self._sessions.verify(cookies.get(COOKIE_NAME)) is not None:
                await self._let_in(scope, receive, send, "session")
                return
            if scope.get("method") in ("GET", "HEAD") and b"hx-request" not in headers:
                await _redirect_to_login(path, send)
                return
        await _refuse(send, htmx=console and b"hx-request" in headers)

    async def _let_in(self, scope: Scope, receive: Receive, send: Send, how: str) -> None:
        scope.setdefault("state", {})["admin_auth"] = how
        await self.app(scope, receive, send)


async def _redirect_to_login(path: str, send: Send) -> None:
    location = f"{CONSOLE_LOGIN}?next={quote(path, safe='/')}"
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [(b"location", location.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def _refuse(send: Send, *, htmx: bool) -> None:
    err = AuthenticationError(
        "Missing or invalid admin token (Authorization: Bearer <OBLIVIATE_ADMIN_TOKEN>)",
        code="invalid_admin_token",
    )
    body = json.dumps(error_body(err)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="obliviate-admin"'),
    ]
    if htmx:  # a console page whose session ran out while it polled: htmx goes to the login
        headers.append((b"hx-redirect", CONSOLE_LOGIN.encode()))
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeys:
    """The /v1 API keys, kept as sha256 digests, each with its tenant; none means /v1 is open.

    A keys entry is `KEY` or `KEY TENANT` (whitespace between): the tenant is the key group
    that forget targets can be scoped to (`scope.tenants` at registration).
    """

    def __init__(self, keys: list[str]) -> None:
        self._digests: dict[bytes, str] = {}
        self._tenants: dict[bytes, str] = {}
        for i, entry in enumerate(k for k in keys if k.strip()):
            key, *tenant = entry.split(None, 1)
            digest = _digest(key)
            self._digests[digest] = f"key:{i}"
            if tenant:
                self._tenants[digest] = tenant[0].strip()

    @classmethod
    def load(cls, keys: list[str], path: Path | None) -> ApiKeys:
        """Keys given inline plus one per line of `path` (blank lines and # comments skipped)."""
        all_keys = list(keys)
        if path is not None:
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    all_keys.append(line)
        return cls(all_keys)

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def identify(self, token: str | None) -> str | None:
        """The key's label (`key:N`, never the key), "" when /v1 is open, None when refused."""
        if not self._digests:
            return ""
        if token is None:
            return None
        return self._digests.get(_digest(token))

    def caller(self, token: str | None) -> Caller | None:
        """Who is calling (key digest and tenant); an empty Caller when /v1 is open; None when
        the key is refused."""
        if not self._digests:
            return Caller()
        if token is None:
            return None
        digest = _digest(token)
        if digest not in self._digests:
            return None
        return Caller(key_digest=digest.hex(), tenant=self._tenants.get(digest))

    def tenant_of(self, key: str) -> str | None:
        """The tenant a key belongs to (None: unknown key or no tenant)."""
        return self._tenants.get(_digest(key))
