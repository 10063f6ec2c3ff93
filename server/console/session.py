"""Console logins: signed, expiring session cookies and CSRF tokens derived from the admin token.

The cookie never holds the admin token. It holds a random session id and an expiry, signed with
a key derived from the token's sha256, so every gateway sharing the token accepts it (no shared
session store), and changing the token logs every console session out. CSRF tokens are an HMAC of
the session id: a page of another site can neither read nor forge one, and the cookie is
SameSite=Strict on top.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE_NAME = "obliviate_console"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class ConsoleSession:
    id: str
    expires: int
    """Unix time after which the cookie is refused."""


class ConsoleSessions:
    """Issues and checks console session cookies and their CSRF tokens."""

    def __init__(self, token: str | None, *, max_age_s: int) -> None:
        # Only the token's digest is kept (as in auth.AdminAuthMiddleware). No token (insecure
        # development mode): a per-process key; logins are not needed then.
        token_digest = hashlib.sha256(token.encode()).digest() if token is not None else None
        seed = token_digest if token_digest is not None else secrets.token_bytes(32)
        self._key = hmac.new(seed, b"obliviate-console-session-v1", hashlib.sha256).digest()
        self._token_digest = token_digest
        self.max_age_s = max_age_s

    @property
    def open(self) -> bool:
        """No admin token (insecure development mode): no login needed."""
        return self._token_digest is None

    def check_token(self, token: str) -> bool:
        """Whether `token` is the admin token (constant-time on the digests)."""
        if self._token_digest is None:
            return True
        given = hashlib.sha256(token.strip().encode()).digest()
        return hmac.compare_digest(given, self._token_digest)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def issue(self, *, now: float | None = None) -> str:
        """A new session cookie value: `<id>.<expiry>.<signature>`."""
        expires = int((now if now is not None else time.time()) + self.max_age_s)
        payload = f"{secrets.token_urlsafe(18)}.{expires}"
        return f"{payload}.{self._sign(payload)}"

    def verify(self, cookie: str | None, *, now: float | None = None) -> ConsoleSession | None:
        """The session a cookie value stands for, or None (forged, malformed or expired)."""
        if not cookie or len(cookie) > 200:
            return None
        payload, _, signature = cookie.rpartition(".")
        session_id, _, expires = payload.partition(".")
        if not (session_id and expires.isdigit() and signature):
            return None
        if not hmac.compare_digest(self._sign(payload).encode(), signature.encode()):
            return None
        if int(expires) <= (now if now is not None else time.time()):
            return None
        return ConsoleSession(session_id, int(expires))

    def csrf_token(self, session: ConsoleSession) -> str:
        """The CSRF token every state-changing console request of this session must carry."""
        return self._sign(f"csrf:{session.id}")

    def check_csrf(self, session: ConsoleSession, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(
            self.csrf_token(session).encode(), str(given).encode()
        )
