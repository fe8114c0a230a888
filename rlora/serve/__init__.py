"""Serving trained adapters: one copy of each base model, many adapters batched together.

No HTTP here: `InferenceEngine` is what the service's routes call (see `engine` for the
threading model). How a FastAPI route uses it::

    engine = InferenceEngine(models_dir=settings.models_dir, cache_dir=home / "models",
                             adapter_cache_bytes=2 << 30)          # one per process
    params = GenerationParams.from_tgi(body.parameters)           # 422 on GenerationValidationError
    handle = await engine.asubmit(body.inputs, params, adapter_id=adapter.id,
                                  adapter_path=adapter.path, base_model=adapter.base_model)
    # POST /generate
    result = await handle.aresult()          # the task being cancelled (client gone) cancels it
    return result.to_dict(details=params.details)
    # POST /generate_stream
    async for event in handle.stream():      # leaving early / disconnect cancels the request
        yield f"data:{json.dumps(event.to_tgi_dict(details=params.details))}\n\n"
    # adapter deleted
    engine.evict(adapter_id)

Errors: `GenerationValidationError` (a ValueError with ``.field``) -> 422;
`rlora.basemodels.UnknownBaseModel` (LookupError), FileNotFoundError (no adapter folder) and
KeyError (adapter not loaded, no path) -> 404; `rlora.AdapterMismatchError` -> 422;
`EngineOverloaded` -> 429; `EngineClosed` -> 503; `RequestCancelled` only reaches a waiter of
a request that was cancelled.
"""

from .adapters import AdapterCache, AdapterTooLarge, LoadedAdapter, PackedLayer, load_adapter, pack_layer, pack_rlora_layer
from .engine import (
    BaseModelRunner,
    EngineClosed,
    EngineOverloaded,
    InferenceEngine,
    RequestCancelled,
    RequestHandle,
)
from .multi_linear import MultiAdapterLinear
from .params import GenerationParams, GenerationResult, GenerationValidationError, Limits, StreamEvent, Token

__all__ = [
    "AdapterCache",
    "AdapterTooLarge",
    "BaseModelRunner",
    "EngineClosed",
    "EngineOverloaded",
    "GenerationParams",
    "GenerationResult",
    "GenerationValidationError",
    "InferenceEngine",
    "Limits",
    "LoadedAdapter",
    "MultiAdapterLinear",
    "PackedLayer",
    "RequestCancelled",
    "RequestHandle",
    "StreamEvent",
    "Token",
    "load_adapter",
    "pack_layer",
    "pack_rlora_layer",
]
