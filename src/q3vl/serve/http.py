"""HTTP plumbing: errors in the OpenAI shape and API-key auth (request bodies: `body.py`).

Every error leaves as `{"error": {"message", "type", "param", "code"}}` with the status its
`q3vl.errors` type maps to (400 bad field or item, 401, 404 unknown model, 413 too large, 429 queue
full with Retry-After, 503 not ready or draining). FastAPI's own validation errors (422) become 400s
whose `param` points into the body the client sent (`input[3]`, `inputs[0].content[1].image_url.url`).
Anything unexpected is a logged 500 that says nothing about the internals.

The middleware is plain ASGI (not `BaseHTTPMiddleware`), so the route can still hear the client
disconnect through `receive`.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from q3vl.errors import (
    AuthenticationError,
    ConfigError,
    InputError,
    OverloadedError,
    Q3VLError,
    UnavailableError,
)
from q3vl.serve.errors import RequestError, RequestTooLargeError, UnknownModelError

log = logging.getLogger(__name__)

# (type, status, OpenAI error type, code), most specific first
STATUS: list[tuple[type[BaseException], int, str, str | None]] = [
    (UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (InputError, 400, "invalid_request_error", "invalid_input"),
    (ConfigError, 400, "invalid_request_error", "invalid_value"),
    (AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (OverloadedError, 429, "rate_limit_error", "queue_full"),
    (UnavailableError, 503, "service_unavailable_error", "unavailable"),
]
MAX_REPORTED_ERRORS = 64  # validation errors examined for the answer (the schemas keep them few: schemas.py)


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A response in the OpenAI error shape."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def from_error(e: BaseException) -> JSONResponse:
    """The response for a q3vl error (a 500 for anything not in `STATUS`)."""
    for cls, status, kind, code in STATUS:
        if isinstance(e, cls):
            headers = None
            if isinstance(e, (OverloadedError, UnavailableError)):
                headers = {"Retry-After": str(e.retry_after)}
            elif isinstance(e, AuthenticationError):
                headers = {"WWW-Authenticate": "Bearer"}
            param = e.param if isinstance(e, RequestError) else None
            message = e.reason if isinstance(e, InputError) and e.index is None else str(e)
            return error_response(status, message, kind, param, code, headers)
    log.error("unexpected %s: %s", type(e).__name__, e)
    return error_response(500, "internal server error", "server_error", None, "internal_error")


def install_handlers(app: FastAPI) -> None:
    """Map q3vl errors, validation errors, HTTP errors and anything else to the OpenAI error shape."""

    async def on_q3vl(request: Request, exc: Exception) -> JSONResponse:
        return from_error(exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_response(exc)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        status = exc.status_code if 400 <= exc.status_code < 600 else 500
        kind = "invalid_request_error" if status < 500 else "server_error"
        return error_response(status, str(exc.detail), kind, None, None, dict(exc.headers or {}) or None)

    async def on_other(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error", "server_error", None, "internal_error")

    app.add_exception_handler(Q3VLError, on_q3vl)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_other)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """A 400 naming the deepest field pydantic complained about, as a path into the client's body."""
    best: tuple[int, str, str] | None = None
    for err in exc.errors()[:MAX_REPORTED_ERRORS]:
        if err.get("type") == "json_invalid":
            return error_response(400, f"invalid JSON: {err.get('msg')}", "invalid_request_error", None,
                                  "invalid_json")
        param, depth = _param(err.get("loc", ()), exc.body, err.get("type", ""))
        if best is None or depth > best[0]:
            best = (depth, param, str(err.get("msg", "invalid value")))
    if best is None:
        return error_response(400, "invalid request body", "invalid_request_error", None, "invalid_value")
    _, param, msg = best
    return error_response(400, f"{param or 'body'}: {msg}"[:1000], "invalid_request_error", param or None,
                          "invalid_value")


def _param(loc: Any, body: Any, kind: str) -> tuple[str, int]:
    """`input[3]`-style path for a pydantic error location, following the body the client sent (union
    member tags such as `list[str]` or `MultiModal` in the location are not part of the path).
    """
    parts: list[str] = []
    value = body
    loc = list(loc)[1:] if loc and loc[0] == "body" else list(loc)
    for k, seg in enumerate(loc):
        last = k == len(loc) - 1
        if isinstance(value, dict) and isinstance(seg, str) and (seg in value or (last and kind == "missing")):
            parts.append(f".{seg}" if parts else seg)
            value = value.get(seg)
        elif isinstance(value, list) and isinstance(seg, int) and 0 <= seg < len(value):
            parts.append(f"[{seg}]")
            value = value[seg]
    return "".join(parts), len(parts)


class AuthMiddleware:
    """Requires `Authorization: Bearer <key>` on every route except the `open` ones."""

    def __init__(self, app: Any, api_key: str, open_paths: set[str]) -> None:
        self.app, self.key, self.open = app, api_key.encode(), open_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in self.open:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                what = "missing" if not given else "invalid"
                await from_error(AuthenticationError(f"{what} API key: send the header 'Authorization: Bearer "
                                                     "<key>'"))(scope, receive, send)
                return
        await self.app(scope, receive, send)
