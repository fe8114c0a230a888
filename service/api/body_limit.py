"""A size limit on request bodies (JSON), answered with 413 before the body is parsed.

File uploads are exempt: they stream to disk under their own limit (``uploads.py``,
``RLORA_MAX_UPLOAD_BYTES``). Every other body is held to ``RLORA_MAX_JSON_BYTES``: a
declared ``Content-Length`` over the limit is refused without reading the body; a body
without one (chunked) is read up to the limit and refused as soon as it passes it.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_body


class BodyLimitMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware), so exempt routes still stream their bodies."""

    def __init__(self, app: ASGIApp, limit: int, exempt: Iterable[tuple[str, str]] = ()):
        self.app = app
        self.limit = limit
        self.exempt = {(method.upper(), path) for method, path in exempt}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
                break
        if declared is not None:
            # The server holds the client to its Content-Length, so checking it suffices.
            if declared.isdigit() and int(declared) > self.limit:
                await self._reject(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return

        # No Content-Length (chunked, or no body): read at most the limit, then replay it.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: let the application see it
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body("payload_too_large", f"request body exceeds the limit of {self.limit} bytes")
        # The unread rest of the body is discarded by the server, which then closes the connection.
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
