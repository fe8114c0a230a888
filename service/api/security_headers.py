"""Security headers on every response: JSON, errors, server-sent event streams, the docs.

- ``X-Content-Type-Options: nosniff``: a browser takes a response for its declared type only
  (a tenant's text is never run as a script or a page);
- ``X-Frame-Options: DENY``: no page of the service in another site's frame;
- ``Referrer-Policy: no-referrer``: no URL (ids) of the service in the requests a page makes;
- ``Cache-Control: no-store``: responses carry tenants' data (and keys, once), so no cache
  along the way or in a browser keeps them (the docs too: simpler than telling them apart).

Pure ASGI, adding the headers to the response's start message, so streams are not buffered.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value  # in place of a route's own (the streams' no-cache)
            await send(message)

        await self.app(scope, receive, send_with_headers)
