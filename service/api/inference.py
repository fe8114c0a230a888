"""The app's inference engine: one `rlora.serve.InferenceEngine` per app (so per process),
made on first use and closed at shutdown.

Nothing is loaded at startup: making the engine is cheap, and a base model is loaded by the
first request that needs it, so the API comes up at once and a process that never serves
/generate never holds a model.
"""

from __future__ import annotations

import threading

from fastapi import FastAPI

from rlora.serve import InferenceEngine, Limits

from service.api.errors import APIError
from service.settings import Settings

_lock = threading.Lock()


def engine_limits(settings: Settings) -> Limits:
    return Limits(
        max_input_tokens=settings.max_input_tokens,
        max_total_tokens=settings.max_total_tokens,
        max_new_tokens=settings.max_new_tokens,
        max_batch_size=settings.max_batch_size,
    )


def make_engine(settings: Settings) -> InferenceEngine:
    return InferenceEngine(
        models_dir=settings.models_dir,
        cache_dir=settings.cache_dir,
        adapter_cache_bytes=settings.adapter_cache_bytes,
        device=settings.inference_device,
        limits=engine_limits(settings),
        default_base_model=settings.default_base_model,
    )


def get_engine(app: FastAPI) -> InferenceEngine:
    """The app's engine, made on first call; a 503 where this process serves no generation."""
    if not app.state.settings.inference_in_api:
        raise APIError(
            503, "generation_not_served",
            "this API process does not serve generation (RLORA_INFERENCE_IN_API=false); send /generate to the process that does",
        )
    engine = getattr(app.state, "engine", None)
    if engine is None:
        with _lock:
            engine = getattr(app.state, "engine", None)
            if engine is None:
                engine = app.state.engine = make_engine(app.state.settings)
    return engine


def current_engine(app: FastAPI) -> InferenceEngine | None:
    """The app's engine if one was made (never makes one)."""
    return getattr(app.state, "engine", None)


def evict_adapter(app: FastAPI, adapter_id: str) -> None:
    """Drop a deleted adapter from the engine's cache (a no-op without an engine)."""
    engine = current_engine(app)
    if engine is not None:
        engine.evict(adapter_id)


def close_engine(app: FastAPI) -> None:
    """Stop the engine's decode loops (shutdown); a later request would make a new one."""
    with _lock:
        engine = getattr(app.state, "engine", None)
        app.state.engine = None
    if engine is not None:
        engine.close()
