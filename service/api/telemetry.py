"""Each request's id, log event and metrics, in one pure ASGI layer (outermost: streams pass
unbuffered, and a 500 is counted and logged like any answer).

The request id is the client's ``X-Request-ID`` when it is a plausible one (1 to 128 letters,
digits and ``._:-``; anything else is replaced, so a log line cannot be forged through it), else
a new one; it is returned in ``X-Request-ID`` and bound to every event logged while the request
runs (`service.logs`), as is its tenant once its key is checked (`service.api.auth`). One event
per request: method, route template, path, status and duration; never headers, query strings
or bodies (keys and datasets travel there).
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import REQUEST_ID_HEADER, log_context, request_id_from
from service.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS

log = logging.getLogger("service.access")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Probes and scrapes, every few seconds: their events only at debug level.
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
# A path no route matched (scanners): one label value, not one per path tried.
UNMATCHED_ROUTE = "unmatched"


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope).get(REQUEST_ID_HEADER))
        started = time.perf_counter()
        status = 500  # the app raised before answering: Starlette's error layer answers 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self._record(scope, status, time.perf_counter() - started)

    @staticmethod
    def _record(scope: Scope, status: int, seconds: float) -> None:
        # The router leaves the matched route in the scope; its path is the template.
        route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
        method = scope["method"] if scope["method"] in _METHODS else "other"
        HTTP_REQUESTS.labels(method, route, str(status)).inc()
        HTTP_REQUEST_DURATION.labels(method, route, str(status)).observe(seconds)
        log.log(
            logging.DEBUG if route in _QUIET_ROUTES else logging.INFO,
            "%s %s %d %.1f ms", method, scope["path"], status, seconds * 1000,
            extra={"method": method, "route": route, "path": scope["path"], "status": status, "duration_ms": round(seconds * 1000, 1)},
        )
