"""`RemoteEngine`: the API process's side of `rlora engine`, with the methods the generation
routes use of an in-process `InferenceEngine` (asubmit, evict) and handles with theirs
(aresult, stream, cancel).

Routing, as TGI's and LoRAX's router does with its shards: a request goes to an engine that
holds its base model already (the adapter's, or the default base model without one), the least
loaded first; when none does, to the least loaded reachable engine, which loads it. Which base
models each engine holds is asked of it (``/info``) every ``engine_refresh_interval`` seconds,
and again on a miss; an engine that accepts a request holds its base model from then on. An
engine that cannot be reached is skipped for the next; when none can take the request,
`EngineUnavailable` (the API's 503) names each and why.

A request's stream has no read timeout (a generation may run for minutes); connecting has a
short one. Closing the stream, or cancelling the task that reads it, closes the HTTP response,
and the engine cancels the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from urllib.parse import quote

import httpx

from rlora.serve import EngineClosed, GenerationParams, GenerationResult, RequestCancelled, StreamEvent

from service.engine.protocol import TOKEN_HEADER, RemoteEngineError, error_from_json, event_from_json
from service.logs import REQUEST_ID_HEADER, current_log_context
from service.settings import Settings

log = logging.getLogger(__name__)

INFO_TIMEOUT = 5.0  # an engine answers /info from its event loop, even while it loads a model
EVICT_TIMEOUT = 5.0
MISS_REFRESH_SECONDS = 1.0  # the least time between refreshes for base models no engine holds


class EngineUnavailable(RuntimeError):
    """No engine could take the request, or the engine went away during it (the API's 503)."""


@dataclasses.dataclass
class EngineEndpoint:
    """One engine process as this API process knows it."""

    url: str
    base_models: set[str] = dataclasses.field(default_factory=set)
    reported_load: int = 0  # running + pending at its last /info
    in_flight: int = 0  # this process's requests streaming from it
    reachable: bool = True

    def rank(self, base_model: str) -> tuple[bool, bool, int, int]:
        """Sort key: reachable first, then holding ``base_model``, then the least loaded."""
        return (not self.reachable, base_model not in self.base_models, self.in_flight, self.reported_load)


class RemoteRequest:
    """A request running on an engine process. One reader: ``stream()`` or ``aresult()``;
    ``cancel()`` from the event loop's thread."""

    def __init__(self, response: httpx.Response, engine: EngineEndpoint):
        self._response = response
        self._engine = engine
        self._cancelled = False
        self._released = False
        self._closing: asyncio.Task | None = None
        engine.in_flight += 1

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._engine.in_flight -= 1

    async def _close(self) -> None:
        self._release()
        with contextlib.suppress(httpx.HTTPError):
            await self._response.aclose()

    def cancel(self) -> None:
        """Stop the request's work: its stream is closed, which the engine takes as a cancel.
        A no-op once it finished."""
        if self._cancelled or self._response.is_closed:
            return
        self._cancelled = True
        self._closing = asyncio.get_running_loop().create_task(self._close())

    async def stream(self) -> AsyncIterator[StreamEvent]:
        """The request's tokens as they come, the last with ``result``; raises the request's
        error. Leaving early, or the reading task being cancelled, cancels the request."""
        try:
            async for line in self._response.aiter_lines():
                if not line:
                    continue
                try:
                    message = json.loads(line)
                    error = message.get("error")
                    event = event_from_json(message["event"]) if error is None else None
                except (ValueError, KeyError, TypeError, AttributeError) as err:
                    lost = f"a malformed line ({_reason(err)})"
                    break
                if error is not None:
                    raise error_from_json(error)
                yield event
                if event.final:
                    return
            else:
                lost = "the stream ended before the request finished"
        except (httpx.HTTPError, httpx.StreamError) as err:
            lost = _reason(err)
        finally:
            await self._close()
        if self._cancelled:  # cancel() closed the stream under the reader
            raise RequestCancelled("the request was cancelled")
        raise EngineUnavailable(f"lost the engine at {self._engine.url} during the request: {lost}")

    async def aresult(self) -> GenerationResult:
        """The result; the awaiting task being cancelled cancels the request."""
        async with contextlib.aclosing(self.stream()) as events:
            async for event in events:
                if event.result is not None:
                    return event.result
        raise AssertionError("stream() ends with the final event or raises")


class RemoteEngine:
    """The engine processes at ``urls``, used as one engine."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        default_base_model: str,
        token: str | None = None,
        connect_timeout: float = 2.0,
        refresh_interval: float = 5.0,
    ):
        self.engines = [EngineEndpoint(url.rstrip("/")) for url in urls]
        self.default_base_model = default_base_model
        self.connect_timeout = connect_timeout
        self.refresh_interval = refresh_interval
        self._headers = {TOKEN_HEADER: token} if token else {}
        # Engines are internal: no proxy from the environment, and no cap on connections
        # (each running stream holds one).
        self._http = httpx.AsyncClient(
            headers=self._headers, trust_env=False, limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )
        self._refreshed_at = -float("inf")
        self._refreshing: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "RemoteEngine":
        return cls(
            settings.engine_url_list, default_base_model=settings.default_base_model, token=settings.engine_token,
            connect_timeout=settings.engine_connect_timeout, refresh_interval=settings.engine_refresh_interval,
        )

    # Which engine holds what.

    async def _read_info(self, engine: EngineEndpoint) -> None:
        try:
            response = await self._http.get(f"{engine.url}/info", timeout=httpx.Timeout(INFO_TIMEOUT, connect=self.connect_timeout))
            response.raise_for_status()
            info = response.json()
            base_models = set(info["base_models"])
            load = sum(m["running"] + m["pending"] for m in info["stats"]["base_models"].values())
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as err:  # down, or not an engine's answer
            engine.reachable = False
            log.warning("engine at %s: no info (%s)", engine.url, _reason(err))
            return
        engine.reachable = True
        engine.base_models = base_models
        engine.reported_load = load

    async def refresh(self, max_age: float = 0.0) -> None:
        """Ask every engine what it holds, unless that was asked less than ``max_age`` seconds
        ago; concurrent callers share one round of questions."""
        if time.monotonic() - self._refreshed_at < max_age:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_all())
        await asyncio.shield(self._refreshing)  # a caller that leaves does not cancel it for the others

    async def _refresh_all(self) -> None:
        await asyncio.gather(*(self._read_info(engine) for engine in self.engines))
        self._refreshed_at = time.monotonic()

    async def _ranked(self, base_model: str) -> list[EngineEndpoint]:
        await self.refresh(self.refresh_interval)
        if not any(e.reachable and base_model in e.base_models for e in self.engines):
            await self.refresh(MISS_REFRESH_SECONDS)
        return sorted(self.engines, key=lambda engine: engine.rank(base_model))

    # Requests.

    async def asubmit(
        self,
        inputs: str | Sequence[int],
        parameters: GenerationParams | None = None,
        *,
        adapter_id: str | None = None,
        adapter_path: str | os.PathLike | None = None,
        base_model: str | None = None,
        tenant: str = "",
    ) -> RemoteRequest:
        """Send the request to an engine; returns once the engine accepted it. Raises what the
        engine's ``submit`` raised, or `EngineUnavailable` when no engine could take it."""
        if adapter_id is None:
            base_model = base_model or self.default_base_model  # named, so that routing and engine agree
        body = {
            "inputs": list(inputs) if not isinstance(inputs, str) else inputs,
            "parameters": dataclasses.asdict(parameters or GenerationParams()),
            "adapter_id": adapter_id,
            "adapter_path": None if adapter_path is None else os.fspath(adapter_path),
            "base_model": base_model,
            "tenant": tenant,
        }
        wanted = base_model or self.default_base_model
        # The engine's events about this request carry the API's request id.
        request_id = current_log_context().get("request_id")
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        problems = []
        for engine in await self._ranked(wanted):
            request = self._http.build_request(
                "POST", f"{engine.url}/generate", json=body, headers=headers, timeout=httpx.Timeout(None, connect=self.connect_timeout),
            )
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as err:
                engine.reachable = False
                problems.append(f"{engine.url}: {_reason(err)}")
                continue
            engine.reachable = True
            if response.status_code == 200:
                engine.base_models.add(wanted)
                return RemoteRequest(response, engine)
            refusal = await _refusal(engine.url, response)
            if isinstance(refusal, (EngineClosed, EngineUnavailable)):  # shutting down, or the token is wrong
                problems.append(f"{engine.url}: {refusal}")
                continue
            raise refusal
        raise EngineUnavailable(f"no inference engine could take the request ({'; '.join(problems) or 'none configured'})")

    def evict(self, adapter_id: str) -> None:
        """Drop a deleted adapter from every engine's cache. Blocking (the adapters route calls it
        from a thread); an engine that does not answer keeps it until its cache pushes it out,
        which is harmless: /generate looks the id up in the database first."""
        for engine in self.engines:
            try:
                response = httpx.delete(
                    f"{engine.url}/adapters/{quote(adapter_id, safe='')}", headers=self._headers, trust_env=False,
                    timeout=httpx.Timeout(EVICT_TIMEOUT, connect=self.connect_timeout),
                )
                response.raise_for_status()
            except httpx.HTTPError as err:
                log.warning("could not evict adapter %s from the engine at %s: %s", adapter_id, engine.url, _reason(err))

    async def aclose(self) -> None:
        await self._http.aclose()


async def _refusal(url: str, response: httpx.Response) -> BaseException:
    """The exception an engine's non-200 answer stands for (the response is read and closed)."""
    try:
        await response.aread()
    finally:
        await response.aclose()
    if response.status_code == 401:
        return EngineUnavailable(f"the engine at {url} refused this process's RLORA_ENGINE_TOKEN")
    try:
        return error_from_json(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return RemoteEngineError(f"the engine at {url} answered {response.status_code}: {response.text[:200]}")


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
