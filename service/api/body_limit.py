"""Request bodies: a size limit (413) and idle and minimum-rate timeouts (408).

File uploads stream to disk under their own limit (``uploads.py``, ``RLORA_MAX_UPLOAD_BYTES``),
so this middleware only times their body. Every other body is read here in full before the
application sees it, held to ``RLORA_MAX_JSON_BYTES``: a declared ``Content-Length`` over the
limit is refused without reading the body; a body without one (chunked) is read up to the limit
and refused as soon as it passes it.

A client that pauses longer than ``RLORA_BODY_IDLE_TIMEOUT`` within its body, or that sends
it slower than ``RLORA_BODY_MIN_RATE`` bytes per second on average once that time has passed,
gets a 408. While a body arrives, the request holds neither a thread nor a database
connection: JSON bodies are read before the route runs, and an upload's route opens its
session only once the file is staged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import anyio
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import APIError, error_body


class BodyTimeout(APIError):
    def __init__(self, message: str):
        # The rest of the body is not read: the server closes the connection after the answer.
        super().__init__(408, "request_timeout", message, headers={"Connection": "close"})


class TimedReceive:
    """``receive`` under the idle and minimum-rate timeouts, until the body has ended."""

    def __init__(self, receive: Receive, idle_timeout: float, min_rate: int):
        self.receive = receive
        self.idle_timeout = idle_timeout
        self.min_rate = min_rate
        self.started: float | None = None
        self.received = 0
        self.ended = False

    async def __call__(self) -> Message:
        if self.ended:
            # Past the body, receive waits for a disconnect (streams, /generate): no limit.
            return await self.receive()
        if self.started is None:
            self.started = time.monotonic()
        with anyio.move_on_after(self.idle_timeout) as wait:
            message = await self.receive()
        if wait.cancelled_caught:
            raise BodyTimeout(f"no part of the request body arrived for {self.idle_timeout:g} s; send the body without pausing")
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.ended = True
            return message
        self.received += len(message.get("body", b""))
        elapsed = time.monotonic() - self.started
        if elapsed > self.idle_timeout and self.received < self.min_rate * elapsed:
            raise BodyTimeout(
                f"the request body arrived at {self.received / elapsed:.0f} bytes/s, "
                f"under the minimum of {self.min_rate} bytes/s"
            )
        return message


class BodyLimitMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware), so exempt routes still stream their bodies."""

    def __init__(
        self, app: ASGIApp, limit: int, idle_timeout: float, min_rate: int, exempt: Iterable[tuple[str, str]] = ()
    ):
        self.app = app
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.min_rate = min_rate
        self.exempt = {(method.upper(), path) for method, path in exempt}
        self.too_large = error_body("payload_too_large", f"request body exceeds the limit of {limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timed = TimedReceive(receive, self.idle_timeout, self.min_rate)
        if (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, timed, send)  # a BodyTimeout reaches the error handlers
            return
        declared = has_body = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
                has_body = value != b"0"
            elif name == b"transfer-encoding":
                has_body = True
        if not has_body:
            await self.app(scope, receive, send)
            return
        # The server holds the client to its Content-Length, so checking it suffices for one.
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send, self.too_large, 413)
            return

        messages: list[Message] = []
        size = 0
        try:
            while True:
                message = await timed()
                messages.append(message)
                if message["type"] != "http.request":
                    break  # a disconnect: let the application see it
                size += len(message.get("body", b""))
                if size > self.limit:
                    await self._reject(scope, receive, send, self.too_large, 413)
                    return
                if not message.get("more_body", False):
                    break
        except BodyTimeout as timeout:
            await self._reject(scope, receive, send, error_body(timeout.code, timeout.message), timeout.status)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, body: dict, status: int) -> None:
        # The unread rest of the body is discarded by the server, which then closes the connection.
        await JSONResponse(body, status_code=status, headers={"Connection": "close"})(scope, receive, send)
