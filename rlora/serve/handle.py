"""A submitted request as its caller holds it: `RequestHandle`, bridging the decode loop's
thread and its callers (threads or asyncio), and the errors a request can end with.

A handle gives the tokens as they come (``events()`` blocking, ``stream()`` async) and the final
`GenerationResult` (``result()`` blocking, ``aresult()`` async). ``cancel()`` (thread-safe,
idempotent) removes the request from the batch before the next step; ``aresult``/``stream``
cancel the request themselves when the awaiting task is cancelled or the stream is closed early,
which is what happens when an HTTP client disconnects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import AsyncIterator, Callable, Iterator

from .params import GenerationParams, GenerationResult, StreamEvent


class RequestCancelled(Exception):
    """The request was cancelled (client gone) before it finished."""


class EngineOverloaded(RuntimeError):
    """Too many requests waiting; the HTTP layer maps it to 429 (TGI: "Model is overloaded")."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


class RequestFailed(RuntimeError):
    """This request failed on its own (e.g. its prompt ran out of memory); the batch went on."""


class NonFiniteScores(RequestFailed):
    """The request's scores were NaN or infinite: its adapter cannot be served."""


_DONE = object()


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class RequestHandle:
    """One submitted request. Thread-safe; usable from threads and from asyncio."""

    def __init__(self, request_id: int, params: GenerationParams, prompt_tokens: int):
        self.id = request_id
        self.params = params
        self.prompt_tokens = prompt_tokens
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._events: list[StreamEvent] = []
        self._closed = False  # no more events (finished, failed or cancelled)
        self._cond = threading.Condition(self._lock)
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._cancel_requested = threading.Event()
        self._on_cancel: Callable[[], None] | None = None

    # -- producer side (the decode loop) --
    def _emit(self, event: StreamEvent) -> None:
        with self._lock:
            self._events.append(event)
            self._cond.notify_all()
            listeners = list(self._listeners)
        for loop, queue in listeners:
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def _close(self, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            listeners = list(self._listeners)
        try:
            if error is not None:
                self._future.set_exception(error)
            else:
                self._future.set_result(result)
        except concurrent.futures.InvalidStateError:  # someone cancelled the future itself
            pass
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except RuntimeError:  # the listener's event loop is closed
                pass

    # -- consumer side --
    @property
    def cancelled(self) -> bool:
        return self._cancel_requested.is_set() or self._future.cancelled()

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """Stop the request's work; a no-op once it finished. Waiters get `RequestCancelled`."""
        if self._future.done():
            return
        self._cancel_requested.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self._future.result(timeout)

    async def aresult(self) -> GenerationResult:
        """Await the result; cancelling the awaiting task cancels the request."""
        waited = asyncio.wrap_future(self._future)
        try:
            return await asyncio.shield(waited)
        except asyncio.CancelledError:
            # Nobody awaits it any more: take its RequestCancelled, or asyncio logs it as
            # "Future exception was never retrieved".
            waited.add_done_callback(_retrieve)
            self.cancel()
            raise

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Blocking iterator over the request's tokens; raises the request's error at the end."""
        index = 0
        while True:
            with self._cond:
                while index >= len(self._events) and not self._closed:
                    if not self._cond.wait(timeout):
                        raise TimeoutError("no token within the timeout")
                pending = self._events[index:]
                closed = self._closed
            for event in pending:
                yield event
            index += len(pending)
            if closed and index >= len(self._events):
                break
        if self._future.exception() is not None:
            raise self._future.exception()

    async def stream(self) -> AsyncIterator[StreamEvent]:
        """Async iterator over the request's tokens (the last has ``result`` set). Raises the
        request's error at the end. Leaving the iteration early (or the task being cancelled,
        e.g. the client disconnected) cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            for event in self._events:
                queue.put_nowait(event)
            if self._closed:
                queue.put_nowait(_DONE)
            else:
                self._listeners.append((loop, queue))
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    finished = True
                    break
                yield item
                if item.final:
                    finished = True
                    break
            if self._future.done() and self._future.exception() is not None:
                raise self._future.exception()
        finally:
            with self._lock:
                if (loop, queue) in self._listeners:
                    self._listeners.remove((loop, queue))
            if not finished:
                self.cancel()

