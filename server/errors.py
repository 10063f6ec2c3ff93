"""One error envelope for every route, streaming included.

    GatewayError                      500 internal_error
    ├── InvalidRequestError           400 invalid_request_error (param names the field)
    │   └── ContextLengthError        400 code=context_length_exceeded
    ├── AuthenticationError           401 authentication_error
    ├── PermissionDeniedError         403 permission_error (console: CSRF check failed)
    ├── NotFoundError                 404 not_found_error (code=model_not_found for models)
    ├── ConflictError                 409 conflict_error
    ├── RateLimitError                429 rate_limit_error (Retry-After)
    ├── EngineError                   502 upstream_error (the engine failed the request)
    └── UnavailableError              503 service_unavailable (not ready, shutting down)

Every one becomes `{"error": {"message", "type", "param", "code"}}` with its status, the shape
openai-python picks its exception class from.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status_code: int = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class InvalidRequestError(GatewayError):
    status_code = HTTPStatus.BAD_REQUEST
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class PayloadTooLargeError(InvalidRequestError):
    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class AuthenticationError(GatewayError):
    status_code = HTTPStatus.UNAUTHORIZED
    error_type = "authentication_error"


class PermissionDeniedError(GatewayError):
    status_code = HTTPStatus.FORBIDDEN
    error_type = "permission_error"


class NotFoundError(GatewayError):
    status_code = HTTPStatus.NOT_FOUND
    error_type = "not_found_error"


class ConflictError(GatewayError):
    status_code = HTTPStatus.CONFLICT
    error_type = "conflict_error"


class RateLimitError(GatewayError):
    status_code = HTTPStatus.TOO_MANY_REQUESTS
    error_type = "rate_limit_error"


class EngineError(GatewayError):
    status_code = HTTPStatus.BAD_GATEWAY
    error_type = "upstream_error"


class UnavailableError(GatewayError):
    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "service_unavailable"


def error_body(err: GatewayError) -> dict[str, Any]:
    """The OpenAI error envelope for `err`."""
    return {
        "error": {
            "message": err.message,
            "type": err.error_type,
            "param": err.param,
            "code": err.code,
        }
    }


def error_sse(err: GatewayError) -> str:
    """The same envelope as one SSE event, for errors after a stream has started."""
    return f"data: {json.dumps(error_body(err))}\n\n"


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic's error list into one readable message and the offending parameter.

    A field no model declares comes first, refused by name with the reason
    (`server.protocol.unsupported`): never silently ignored.
    """
    from server.protocol.unsupported import reason

    kinds: list[tuple[str | None, str]] = []
    refused: list[tuple[str | None, str]] = []
    parts: list[tuple[str | None, str]] = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden" and param:
            refused.append((param, f"Unsupported parameter: {loc[-1]} ({reason(loc[-1])})"))
        elif loc and loc[-1] == "type":  # an unsupported kind (a tool, a part) explains the rest
            kinds.append((param, str(err.get("msg"))))
        else:
            parts.append((param, str(err.get("msg"))))
    ordered = kinds + refused + parts
    if not ordered:
        return "Invalid request", None
    message = "; ".join(f"{p}: {m}" if p else m for p, m in ordered)
    first = next((p for p, _ in ordered if p), None)
    return message, first
