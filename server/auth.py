"""Admin authentication: pure ASGI, default-deny on /admin, hashed constant-time compare."""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import AuthenticationError, error_body

ADMIN_PREFIX = "/admin"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class AdminAuthMiddleware:
    """Every /admin request needs `Authorization: Bearer <token>`; nothing else is touched.

    Only the token's sha256 is kept, and digests are compared in constant time, so neither the
    token nor its length leaks through memory dumps or timing. `token=None` means the operator
    explicitly chose the insecure development mode.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._digest = _digest(token) if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or self._digest is None
            or not (path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"))
        ):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        scheme, _, token = given.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self._digest):
            await self.app(scope, receive, send)
            return
        err = AuthenticationError(
            "Missing or invalid admin token (Authorization: Bearer <OBLIVIATE_ADMIN_TOKEN>)",
            code="invalid_admin_token",
        )
        body = json.dumps(error_body(err)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="obliviate-admin"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
