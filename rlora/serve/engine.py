"""`InferenceEngine`: what the service calls to generate. Base models are loaded once by name (a
`BaseModelRunner` each, with its decode loop, see `scheduler`), adapters on demand into a
byte-bounded LRU cache, and requests for different adapters of one base model share its batch.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..adapter.folder import AdapterMismatchError
from ..basemodels import load_base_model, resolve_base_model
from ..quantization import bnb_config
from .adapters import AdapterCache, LoadedAdapter, is_adapter_folder, load_adapter, read_servable_config
from .handle import EngineClosed, RequestHandle
from .observer import ServingObserver
from .params import GenerationParams, GenerationResult, GenerationValidationError, Limits, as_params
from .scheduler import BaseModelRunner

DEFAULT_ADAPTER_CACHE_BYTES = 1 << 30


class InferenceEngine:
    """Base models by name (loaded once, on first use), adapters by id (loaded on demand into a
    byte-bounded LRU cache), and one `BaseModelRunner` decode loop per base model.

    ``cache_dir`` (where built-in models are built) and ``models_dir`` are those of
    `rlora.basemodels.resolve_base_model`; ``device`` and ``dtype`` are given to
    `rlora.basemodels.load_base_model`. On a GPU each base model's decode steps run as captured
    CUDA graphs unless ``cuda_graphs`` is False. ``observer`` is told of decode steps, first
    tokens and finished requests (for the caller's metrics).
    """

    def __init__(
        self,
        *,
        models_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        adapter_cache_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        limits: Limits | None = None,
        default_base_model: str | None = None,
        cuda_graphs: bool = True,
        observer: ServingObserver | None = None,
        quantization: str = "none",
    ):
        self.models_dir = models_dir
        self.cache_dir = cache_dir
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.limits = limits or Limits()
        self.default_base_model = default_base_model
        self.cuda_graphs = cuda_graphs
        bnb_config(quantization, torch.float32)  # refuses an unknown form, or one without bitsandbytes
        self.quantization = quantization
        self.observer = observer or ServingObserver()
        self.adapters = AdapterCache(adapter_cache_bytes)
        self._runners: dict[str, BaseModelRunner] = {}
        self._models_lock = threading.Lock()
        self._adapter_lock = threading.Lock()
        self._closed = False

    # Base models.

    def base_model(self, name: str, quantization: str | None = None) -> BaseModelRunner:
        """The runner of base model ``name`` in form ``quantization`` (default: the engine's),
        loading it on first use (raises `rlora.basemodels.UnknownBaseModel`, a LookupError, for
        an unknown name). Each form is a model of its own, batched apart."""
        quantization = quantization or self.quantization
        key = name if quantization == "none" else f"{name}@{quantization}"
        with self._models_lock:
            if self._closed:
                raise EngineClosed("the inference engine is shut down")
            runner = self._runners.get(key)
            if runner is None:
                path = resolve_base_model(name, self.models_dir, self.cache_dir)
                model, tokenizer = load_base_model(path, dtype=self.dtype, device=self.device, quantization=quantization)
                # Capturing bitsandbytes' kernels in CUDA graphs has not been checked on a GPU yet.
                graphs = self.cuda_graphs and quantization == "none"
                runner = BaseModelRunner(name, model, tokenizer, self.limits, cuda_graphs=graphs, observer=self.observer)
                self._runners[key] = runner
            return runner

    def _form(self, adapter: LoadedAdapter | None) -> str:
        """The form of the base an adapter is served over: the one it was trained over when that
        was quantized (QLoRA), else the engine's."""
        return adapter.quantization if adapter is not None and adapter.quantization != "none" else self.quantization

    def loaded_base_models(self) -> list[str]:
        return list(self._runners)

    # Adapters.

    def adapter(self, adapter_id: str, path: str | os.PathLike | None = None, *, base_model: str | None = None) -> LoadedAdapter:
        """The adapter ``adapter_id``, from the cache or loaded from ``path``. Checks that it was
        made for the base model (fingerprint) and, when given, that it is ``base_model``."""
        cached = self.adapters.get(adapter_id)
        if cached is not None and (path is None or Path(path) == cached.path):
            self.adapters.hits += 1
            if base_model is not None and cached.base_model != base_model:
                raise AdapterMismatchError(f"adapter {adapter_id!r} is for base model {cached.base_model!r}, not {base_model!r}")
            return cached
        if path is None:
            raise KeyError(f"adapter {adapter_id!r} is not loaded and no path was given")
        if not is_adapter_folder(Path(path)):
            raise FileNotFoundError(f"no adapter folder at {str(path)!r} (adapter {adapter_id!r})")
        _, meta = read_servable_config(adapter_id, path)
        if base_model is None:
            base_model = meta.get("base_model_name") or self.default_base_model
            if base_model is None:
                raise AdapterMismatchError(f"adapter {adapter_id!r} names no base model")
        trained_over = meta.get("base_model_quantization", "none")
        runner = self.base_model(base_model, trained_over if trained_over != "none" else None)
        with self._adapter_lock:
            cached = self.adapters.get(adapter_id)
            if cached is not None and cached.path == Path(path) and cached.base_model == base_model:
                self.adapters.hits += 1  # loaded by another request meanwhile
                return cached
            self.adapters.misses += 1
            adapter = load_adapter(
                adapter_id, path, base_model=base_model, fingerprint=runner.fingerprint,
                linear_shapes=runner.linear_shapes, device=runner.device, out_dtype=runner.dtype,
            )
            self.adapters.put(adapter)
            return adapter

    def evict(self, adapter_id: str) -> bool:
        """Drop a (deleted) adapter from the cache; requests already running finish with it."""
        return self.adapters.evict(adapter_id)

    # Requests.

    def submit(
        self,
        inputs: str | Sequence[int],
        parameters: GenerationParams | Mapping[str, Any] | None = None,
        *,
        adapter_id: str | None = None,
        adapter_path: str | os.PathLike | None = None,
        base_model: str | None = None,
        tenant: str = "",
    ) -> RequestHandle:
        """Validate and queue a request of ``tenant`` (queues and caps are per tenant, see
        `Limits`); returns at once. Raises `GenerationValidationError` (422),
        `rlora.basemodels.UnknownBaseModel` (LookupError), FileNotFoundError or
        `AdapterMismatchError` for the adapter, `EngineOverloaded` (429)."""
        params = as_params(parameters)
        adapter = None
        if adapter_id is not None:
            adapter = self.adapter(adapter_id, adapter_path, base_model=base_model)
            base_model = adapter.base_model
        base_model = base_model or self.default_base_model
        if base_model is None:
            raise GenerationValidationError("base_model", "no base model: give one, or an adapter")
        return self.base_model(base_model, self._form(adapter)).submit(inputs, params, adapter, tenant)

    async def asubmit(self, inputs, parameters=None, **kwargs) -> RequestHandle:
        """`submit` without blocking the event loop (tokenizing and loading run in a thread)."""
        return await asyncio.to_thread(self.submit, inputs, parameters, **kwargs)

    def generate(self, inputs, parameters=None, *, timeout: float | None = None, **kwargs) -> GenerationResult:
        handle = self.submit(inputs, parameters, **kwargs)
        try:
            return handle.result(timeout)
        except BaseException:
            handle.cancel()
            raise

    async def agenerate(self, inputs, parameters=None, **kwargs) -> GenerationResult:
        handle = await self.asubmit(inputs, parameters, **kwargs)
        return await handle.aresult()

    def logits(self, sequences: Sequence[Sequence[int]], adapter_ids: Sequence[str | None], *, base_model: str) -> list[torch.Tensor]:
        """Logits of whole sequences through the serving path (adapters must be loaded)."""
        adapters = [None if a is None else self.adapter(a, base_model=base_model) for a in adapter_ids]
        forms = {self._form(a) for a in adapters}
        if len(forms) > 1:
            raise ValueError(f"adapters over bases in different forms ({', '.join(sorted(forms))}) are not batched together")
        return self.base_model(base_model, forms.pop()).logits(sequences, adapters)

    def stats(self) -> dict:
        return {
            "base_models": {
                name: {"running": r.running, "pending": r.pending, "steps": r.steps, "kv_cache_bytes": r.cache.nbytes,
                       "adapter_table_bytes": r.adapter_slots.nbytes, "captured_steps": len(r.graphs)}
                for name, r in list(self._runners.items())
            },
            "adapters": len(self.adapters),
            "adapter_bytes": self.adapters.nbytes,
            "adapter_cache_bytes": self.adapters.max_bytes,
            "adapter_cache_hits": self.adapters.hits,
            "adapter_cache_misses": self.adapters.misses,
            "adapter_cache_evictions": self.adapters.evictions,
        }

    def close(self) -> None:
        with self._models_lock:
            self._closed = True
            runners = list(self._runners.values())
        for runner in runners:
            runner.close()

    def __enter__(self) -> "InferenceEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
