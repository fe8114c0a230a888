"""The app's inference engine, made on first use and closed at shutdown: a `RemoteEngine`
forwarding to the `rlora engine` processes when ``RLORA_ENGINE_URLS`` names them, else (the
embedded default) one `rlora.serve.InferenceEngine` in this process.

Nothing is loaded at startup: making either is cheap, and a base model is loaded by the first
request that needs it, so the API comes up at once and a process that never serves /generate
never holds a model.
"""

from __future__ import annotations

import asyncio
import threading

from fastapi import FastAPI

from rlora.serve import InferenceEngine, RequestHandle

from service.api.errors import APIError
from service.engine.client import RemoteEngine, RemoteRequest
from service.engine.local import make_engine

Engine = InferenceEngine | RemoteEngine
Handle = RequestHandle | RemoteRequest

_lock = threading.Lock()


def get_engine(app: FastAPI) -> Engine:
    """The app's engine, made on first call; a 503 where this process serves no generation."""
    settings = app.state.settings
    if not settings.engine_urls and not settings.inference_in_api:
        raise APIError(
            503, "generation_not_served",
            "this API process does not serve generation (RLORA_INFERENCE_IN_API=false and no RLORA_ENGINE_URLS); "
            "send /generate to the process that does",
        )
    engine = getattr(app.state, "engine", None)
    if engine is None:
        with _lock:
            engine = getattr(app.state, "engine", None)
            if engine is None:
                engine = app.state.engine = RemoteEngine.from_settings(settings) if settings.engine_urls else make_engine(settings)
    return engine


def current_engine(app: FastAPI) -> Engine | None:
    """The app's engine if one was made (never makes one)."""
    return getattr(app.state, "engine", None)


def evict_adapter(app: FastAPI, adapter_id: str) -> None:
    """Drop a deleted adapter from the engines' caches: every engine process's when generation
    is forwarded (they may hold it whether or not this process sent it there), else this
    process's engine if one was made. Blocking: call it from a thread."""
    engine = get_engine(app) if app.state.settings.engine_urls else current_engine(app)
    if engine is not None:
        engine.evict(adapter_id)


async def close_engine(app: FastAPI) -> None:
    """Stop the engine's decode loops, or close the connections to the engine processes
    (shutdown); a later request would make a new one."""
    with _lock:
        engine = getattr(app.state, "engine", None)
        app.state.engine = None
    if isinstance(engine, RemoteEngine):
        await engine.aclose()
    elif engine is not None:
        await asyncio.to_thread(engine.close)
