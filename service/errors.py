"""One JSON error shape for every failure: ``{"error": {"code", "message", "field"?, "details"?}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "mixture", 0, "file_id")`` -> ``mixture[0].file_id``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def pydantic_details(errors: list[dict[str, Any]], prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    details = []
    for error in errors:
        path = field_path(prefix + tuple(error["loc"]))
        details.append({"field": path, "message": error["msg"]} if path else {"message": error["msg"]})
    return details


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
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.field, exc.details), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = pydantic_details(list(exc.errors()))
        if not details:
            return JSONResponse(error_body("invalid_request", "invalid request"), status_code=422)
        first = details[0]
        field = first.get("field")
        message = f"{field}: {first['message']}" if field else first["message"]
        return JSONResponse(error_body("invalid_request", message, field, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug or an outage, never the client's input: log it whole, answer in the same shape.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
