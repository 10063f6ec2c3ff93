"""Admin authentication: pure ASGI, default-deny on /admin, hashed constant-time compare."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import AuthenticationError, error_body
from server.services.tenancy import Caller

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
