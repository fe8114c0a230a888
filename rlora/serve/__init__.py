"""Serving trained adapters: one copy of each base model, many adapters batched together.

No HTTP here: `InferenceEngine` is what the service's routes call; the TGI wire format is the
service's (``service/api/tgi.py``). The modules, in the order a request meets them:

    engine        InferenceEngine: base models by name, the adapter cache, submit/evict/close
    params        GenerationParams (value checks against Limits), GenerationResult, StreamEvent
    handle        RequestHandle (threads and asyncio), RequestCancelled/EngineOverloaded/EngineClosed
    scheduler     BaseModelRunner: one base model's loop (admission, prefill chunks, decode steps)
    request       one running request: the loop's bookkeeping, its tokens, text, stops and result
    queues        TenantQueues: waiting requests per tenant, bounded, taken round-robin under caps
    kv_cache      SlotKVCache: the KV cache allocated once, a slot per row
    slots         AdapterSlots: the running requests' adapters in fixed slots of per-layer tables
    multi_linear  MultiAdapterLinear: each row's adapter read from the slot tables (routing recorded there)
    batch         bucketed step sizes, prefill chunks, attention masks
    graphs        CapturedSteps: decode steps as CUDA graphs, one per shape
    sampling      BatchSampler: every row's token at once on the device, per-request seeded draws
    output        OutputThread: detokenising, stop sequences and events off the loop's thread
    detokenize    incremental detokenisation
    stopping      eos, length and stop sequences
    adapters      adapter folders packed for serving, the byte-bounded LRU cache (hits, misses, evictions)
    observer      ServingObserver: decode steps, first tokens, finished requests, for a caller's metrics

How a route uses it::

    engine = InferenceEngine(cache_dir=settings.cache_dir, models_dir=settings.models_dir,
                             adapter_cache_bytes=2 << 30)          # one per process
    params = GenerationParams(max_new_tokens=64, details=True)    # GenerationValidationError: 422
    handle = await engine.asubmit(inputs, params, adapter_id=adapter.id,
                                  adapter_path=adapter.path, base_model=adapter.base_model)
    result = await handle.aresult()          # the task being cancelled (client gone) cancels it
    async for event in handle.stream():      # or token by token; leaving early cancels it
        ...
    engine.evict(adapter_id)                 # adapter deleted

Errors: `GenerationValidationError` (a ValueError with ``.field``) -> 422;
`rlora.basemodels.UnknownBaseModel` (LookupError), FileNotFoundError (no adapter folder) and
KeyError (adapter not loaded, no path) -> 404; `rlora.AdapterMismatchError` and
`AdapterUnusable` -> 422; `EngineOverloaded` -> 429; `EngineClosed` -> 503. After submission a
request may end with `NonFiniteScores` (its adapter's outputs overflow; 422) or `RequestFailed`
(it failed alone, e.g. out of memory in its prompt; 503), the rest of the batch going on;
`RequestCancelled` only reaches a waiter of a request that was cancelled.
"""

from .adapters import AdapterCache, AdapterUnusable, AdapterTooLarge, LoadedAdapter, PackedLayer, load_adapter, pack_layer
from .engine import InferenceEngine
from .handle import EngineClosed, EngineOverloaded, NonFiniteScores, RequestCancelled, RequestFailed, RequestHandle
from .multi_linear import MultiAdapterLinear
from .observer import ServingObserver
from .params import GenerationParams, GenerationResult, GenerationValidationError, Limits, StreamEvent, Token
from .scheduler import BaseModelRunner

__all__ = [
    "AdapterCache",
    "AdapterUnusable",
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
    "NonFiniteScores",
    "PackedLayer",
    "RequestCancelled",
    "RequestFailed",
    "RequestHandle",
    "ServingObserver",
    "StreamEvent",
    "Token",
    "load_adapter",
    "pack_layer",
]
