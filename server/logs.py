"""Logging set-up (text or JSON lines) and request ids carried into every log record.

`RequestIdMiddleware` takes the client's `X-Request-ID` (when it is a sane one) or makes one,
returns it as a response header, and keeps it in a context variable for the whole request, so
every record logged while serving it (the gateway's, the guard's audit lines, a library's) carries
`request_id`.
"""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_request_id: ContextVar[str | None] = ContextVar("obliviate_request_id", default=None)

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"


def current_request_id() -> str | None:
    """The id of the request being served in this context, if any."""
    return _request_id.get()


def sane_request_id(given: str | None) -> str:
    """`given` when it is a short id of letters, digits, '-' and '_'; else a fresh one."""
    if given and len(given) <= 128 and given.replace("-", "").replace("_", "").isalnum():
        return given
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds `request_id` ("-" outside a request) to every record that passes a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get() or "-"
        return True


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Root handler on stderr in the chosen format; uvicorn's loggers go through it too."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"})
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own handlers would print a second, unformatted copy of its lines.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


class RequestIdMiddleware:
    """Pure ASGI: one request id per HTTP request, in the context and the response headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = sane_request_id(given)
        token = _request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)
