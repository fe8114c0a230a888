"""The streamed answer of one engine request, for the API's event stream and the engine's JSON
lines alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class RequestStreamResponse(StreamingResponse):
    """``content`` streamed for the request ``handle`` (anything with ``cancel()``). However the
    response ends (finished, client gone, error), the request is cancelled (a no-op once it
    finished) and ``content`` closed."""

    def __init__(self, handle: Any, content: AsyncIterator[bytes], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
