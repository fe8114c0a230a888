"""One JSON error shape for every failure: ``{"error": {"code", "message", "field"?, "details"?}}``.

Routes that speak another API's wire format answer in its error shape instead: their route
class has a ``render_error`` (an `APIError` -> the response), which every handler here uses for
the route that was matched (TGI's on the generate routes, OpenAI's on the OpenAI routes).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from rlora.data import lone_surrogate

from service.jobs.quotas import QuotaExceeded
from service.problems import validation_problems

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = details
        self.headers = headers


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, "not_found", f"no {kind} {object_id!r}")


def invalid(field: str, message: str, details: list[dict[str, Any]] | None = None) -> APIError:
    return APIError(422, "invalid_request", message, field=field, details=details)


def invalid_fields(details: list[dict[str, Any]]) -> APIError:
    """A 422 for several bad fields (each detail has field and message); the first leads."""
    first = details[0]
    field = first.get("field")
    message = f"{field}: {first['message']}" if field else first["message"]
    return APIError(422, "invalid_request", message, field=field, details=details)


def _lone_surrogate(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        index = lone_surrogate(value)
        return None if index is None else (path, value[index])
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, path) or _lone_surrogate(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{index}]")
            if found:
                return found
    return None


def reject_lone_surrogates(value: Any, field: str = "") -> None:
    """A 422 naming the field when a string in ``value`` holds a lone UTF-16 surrogate.

    JSON may spell one (``"\\ud800"``) and Python parses it, but it is no Unicode text: it
    cannot be encoded, tokenized, stored or sent back, so it is refused up front.
    """
    found = _lone_surrogate(value, field)
    if found:
        path, char = found
        message = f"contains an unpaired surrogate \\u{ord(char):04x}, which is not valid Unicode; send valid UTF-8 text"
        raise invalid(path or "body", f"{path}: {message}" if path else message)


def error_body(code: str, message: str, field: str | None = None, details: list[dict[str, Any]] | None = None) -> dict:
    """The one error shape, as a JSON-ready dict."""
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    if details:
        error["details"] = details
    return {"error": error}


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    408: "request_timeout",
    429: "too_many_requests",
}

# Seconds a client is asked to wait (Retry-After) when the service is overloaded or the
# database unavailable.
RETRY_AFTER = "5"


def _unavailable_error(message: str) -> APIError:
    """A 503 the client may retry, with Retry-After."""
    return APIError(503, "unavailable", message, headers={"Retry-After": RETRY_AFTER})


def _json_position(doc: Any, pos: Any) -> str:
    if not isinstance(doc, str) or not isinstance(pos, int):
        return ""
    line = doc.count("\n", 0, pos) + 1
    column = pos - doc.rfind("\n", 0, pos)
    return f" (line {line}, column {column})"


def _body_error(request: Request, exc: RequestValidationError) -> APIError | None:
    """An error about the JSON body as a whole (not JSON, not an object, missing), if that is
    what failed; field errors are left to the usual 422."""
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        if not loc or loc[0] != "body":
            continue
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            where = _json_position(exc.body, loc[1] if len(loc) > 1 else None)
            return invalid("body", f"request body is not valid JSON: {reason}{where}")
        if len(loc) != 1:
            continue
        value = error.get("input")
        if isinstance(value, (bytes, bytearray)):
            # FastAPI hands over the raw bytes when the Content-Type is not JSON.
            content_type = request.headers.get("content-type")
            got = f"got {content_type!r}" if content_type else "no Content-Type was sent"
            return APIError(415, "unsupported_media_type", f"send the request body as JSON with 'Content-Type: application/json' ({got})")
        if error.get("type") == "missing":
            return APIError(422, "invalid_request", "a JSON request body is required", field="body")
        if error.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            kind = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
            return APIError(422, "invalid_request", f"the request body must be a JSON object, got {kind.get(type(value), 'something else')}", field="body")
    return None


# What json.loads raises for a body it refuses other than by a syntax error (a syntax error,
# JSONDecodeError, reaches the validation handler as "json_invalid"): FastAPI answers these
# with a bare 400 that keeps the exception as its cause.
_JSON_PARSE_FAILURES = (ValueError, RecursionError)


def _unparsable_body(cause: BaseException) -> APIError:
    """JSON that json.loads refuses other than by a syntax error."""
    if isinstance(cause, UnicodeDecodeError):
        message = f"request body is not valid UTF-8 (byte {cause.start + 1})"
    elif isinstance(cause, RecursionError):
        message = "request body is not valid JSON: nested too deeply"
    elif isinstance(cause, ValueError) and "digits" in str(cause):
        message = "request body is not valid JSON: a number has too many digits"
    else:
        message = "request body could not be parsed as JSON"
    return invalid("body", message)


def _render(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.code, err.message, err.field, err.details), status_code=err.status, headers=err.headers)


def error_response(request: Request, err: APIError) -> JSONResponse:
    """``err`` in the error shape of the route ``request`` matched (the service's by default)."""
    render = getattr(request.scope.get("route"), "render_error", _render)
    return render(err)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method a route of the request's path serves: Starlette's 405 names only the first
    route's, where one path has several route objects (GET and POST /v1/files)."""
    routes = request.app.router.routes
    allowed = [
        method for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(QuotaExceeded)
    async def _quota_exceeded(request: Request, exc: QuotaExceeded) -> JSONResponse:
        # 403, not 429 (no rate: waiting does not help) nor 413 (about one body, not what is kept).
        details = [{"quota": exc.quota, "limit": exc.limit, "usage": exc.usage}]
        return await _api_error(request, APIError(403, "quota_exceeded", str(exc), details=details))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        body_error = _body_error(request, exc)
        if body_error is not None:
            return await _api_error(request, body_error)
        details = validation_problems(exc.errors())
        if not details:
            return error_response(request, APIError(422, "invalid_request", "invalid request"))
        return await _api_error(request, invalid_fields(details))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, _JSON_PARSE_FAILURES):
            # FastAPI's 400 for a body json.loads refused: a 422 like any other unparsable
            # JSON body, saying what was wrong with it.
            return await _api_error(request, _unparsable_body(exc.__cause__))
        code = _STATUS_CODES.get(exc.status_code, "error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return error_response(request, APIError(exc.status_code, code, str(exc.detail), headers=headers or None))

    @app.exception_handler(OperationalError)
    async def _database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        # The database is down, unreachable or locked: an outage the client may retry, not a bug.
        log.error("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(request, _unavailable_error("the database is unavailable; retry later"))

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(request: Request, exc: PoolTimeout) -> JSONResponse:
        # Every pooled connection stayed busy for RLORA_DATABASE_POOL_TIMEOUT: overload, answered
        # at once so that the client backs off instead of piling on.
        log.warning("no database connection free on %s %s: %s", request.method, request.url.path, exc)
        return error_response(request, _unavailable_error("the service is overloaded; retry later"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug or an outage, never the client's input: log it whole, answer in the same shape.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, APIError(500, "internal_error", "internal server error"))
