"""Adapters for inference: the eval-mode adapter math in packed form, loading an adapter folder
against a served base model, and the LRU cache bounded in bytes.

An adapted layer in eval mode (no dropout) computes, with ``z = [A; W_r; A0; W_r0] x``:

    h = z[:r]; w = softmax(z[r:r+N]) (1 without a router); h0 = z[r+N:r+N+r0]
    w0 = softmax(z[r+N+r0:]) (1 without an initial router: the correction's one mean head)
    y = W x + b + [s*B_1 .. s*B_N | -s*B0_1 .. -s*B0_N0] [w_1 h; ..; w_N h; w0_1 h0; ..; w0_N0 h0]

The correction is not linear in x once the initial router weighs it, so it cannot be folded
into a matrix: it is served as the layer computes it, a second set of heads. Each layer is
held as two matrices: ``reads`` (r + N_router + r0 + N0_router, d_in) and ``writes``
(d_out, N*r + N0*r0), exactly the tensors of the adapter file (their bytes are the adapter's
own size), packed by `rlora.adapter.fused` as `RLoRALinear` packs them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..adapter.inject import is_target
from ..adapter.config import AdapterConfig, AdapterConfigError
from ..adapter.folder import WEIGHTS_FILE, AdapterMismatchError, check_base_model, is_adapter_folder, read_adapter_config
from ..adapter.fused import correction_heads, pack_reads, pack_writes


class AdapterTooLarge(ValueError):
    """An adapter bigger than the whole adapter cache."""


class AdapterUnusable(ValueError):
    """An adapter that cannot be served: NaN or infinite weights (after its scaling: they would
    fail every request on it and spill into other rows' zero products), or settings outside
    what this library accepts (e.g. an alpha saved before the bound on it)."""


def read_servable_config(adapter_id: str, path: str | os.PathLike) -> tuple[AdapterConfig, dict]:
    """`read_adapter_config`, an invalid configuration raised as `AdapterUnusable`."""
    try:
        return read_adapter_config(path)
    except AdapterConfigError as err:
        raise AdapterUnusable(f"adapter {adapter_id!r}: {err}") from None


@dataclass
class PackedLayer:
    """One adapted layer, eval mode. ``reads`` in the adapter's dtype, ``writes`` pre-scaled and
    in the base model's dtype (as `RLoRALinear` casts them before its output matmul)."""

    rank: int
    heads: int
    has_router: bool
    correction_rank: int  # r when the frozen init correction is present, else 0
    # The correction's initial heads: N when weighed by the initial router (then N router rows
    # more in reads), 1 (the mean initial head, weight 1) without it, 0 without a correction.
    correction_heads: int
    correction_routed: bool
    reads: torch.Tensor  # (rank + router_rows + correction_rank + correction_router_rows, d_in)
    writes: torch.Tensor  # (d_out, heads * rank + correction_heads * correction_rank)

    @property
    def nbytes(self) -> int:
        return self.reads.numel() * self.reads.element_size() + self.writes.numel() * self.writes.element_size()

    @property
    def router_rows(self) -> int:
        return self.heads if self.has_router else 0

    @property
    def correction_router_rows(self) -> int:
        return self.correction_heads if self.correction_routed else 0


def pack_layer(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router: torch.Tensor | None,
    lora_A0: torch.Tensor | None,
    router0: torch.Tensor | None,
    lora_B0: torch.Tensor | None,
    scaling: float,
    out_dtype: torch.dtype | None = None,
) -> PackedLayer:
    """The packed eval-mode form of one layer's adapter tensors (names as in the file format),
    packed as `RLoRALinear` packs them."""
    heads, _, rank = lora_B.shape
    return PackedLayer(
        rank=rank,
        heads=heads,
        has_router=router is not None,
        correction_rank=0 if lora_A0 is None else lora_A0.shape[0],
        correction_heads=correction_heads(lora_B0),
        correction_routed=router0 is not None,
        reads=pack_reads(lora_A, router, lora_A0, router0, lora_A.dtype),
        writes=pack_writes(lora_B, lora_B0, scaling, out_dtype or lora_B.dtype),
    )


@dataclass
class LoadedAdapter:
    """An adapter ready to serve on one base model."""

    adapter_id: str
    path: Path
    base_model: str
    config: AdapterConfig
    layers: dict[str, PackedLayer]
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    @property
    def has_router(self) -> bool:
        return any(layer.has_router for layer in self.layers.values())

    @property
    def quantization(self) -> str:
        """The form of the base model it was trained over ("none", "nf4", "int8")."""
        return self.meta.get("base_model_quantization", "none")


def load_adapter(
    adapter_id: str,
    path: str | os.PathLike,
    *,
    base_model: str,
    fingerprint: str,
    linear_shapes: dict[str, tuple[int, int]],
    device: torch.device | str = "cpu",
    out_dtype: torch.dtype = torch.float32,
) -> LoadedAdapter:
    """Read an adapter folder for the base model with ``fingerprint`` whose linear layers (path ->
    (d_out, d_in)) are ``linear_shapes``. Raises FileNotFoundError for a missing folder and
    `AdapterMismatchError` for an adapter of another base model or with inconsistent tensors."""
    path = Path(path)
    if not is_adapter_folder(path):
        raise FileNotFoundError(f"no adapter folder at {str(path)!r} (adapter {adapter_id!r})")
    config, meta = read_servable_config(adapter_id, path)
    check_base_model(meta, fingerprint, adapter=adapter_id, base_model=base_model)
    tensors = load_file(path / WEIGHTS_FILE, device=str(device))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, key = name.rpartition(".")
        modules.setdefault(module, {})[key] = tensor
    if not modules:
        raise AdapterMismatchError(f"adapter {adapter_id!r} has no tensors")
    layers = {}
    for module, parts in modules.items():
        _check_module(adapter_id, module, parts, config, linear_shapes)
        packed = layers[module] = pack_layer(
            parts["lora_A"], parts["lora_B"], parts.get("router"), parts.get("lora_A0"), parts.get("router0"), parts.get("lora_B0"),
            config.scaling, out_dtype,
        )
        if not (torch.isfinite(packed.reads).all() and torch.isfinite(packed.writes).all()):
            raise AdapterUnusable(f"adapter {adapter_id!r}, module {module!r}: weights (times its scaling {config.scaling:g}) are not finite numbers")
    return LoadedAdapter(adapter_id=adapter_id, path=path, base_model=base_model, config=config, layers=layers, meta=meta)


def _check_module(adapter_id, module, parts, config: AdapterConfig, linear_shapes) -> None:
    def fail(message):
        raise AdapterMismatchError(f"adapter {adapter_id!r}, module {module!r}: {message}")

    if module not in linear_shapes:
        fail("no such linear layer in the base model")
    if not is_target(config, module):
        fail(f"not among the adapter's target_modules {list(config.target_modules)}")
    expected = {"lora_A", "lora_B"} | ({"router"} if config.has_router else set())
    if config.uses_random_init:
        expected |= {"lora_A0", "lora_B0"} | ({"router0"} if config.routes_correction else set())
    if set(parts) != expected:
        fail(f"tensors {sorted(parts)}, expected {sorted(expected)}")
    d_out, d_in = linear_shapes[module]
    n, r = config.heads, config.rank
    shapes = {
        "lora_A": (r, d_in), "lora_B": (n, d_out, r), "router": (n, d_in), "lora_A0": (r, d_in), "router0": (n, d_in),
        "lora_B0": (n, d_out, r) if config.routes_correction else (d_out, r),
    }
    for key, tensor in parts.items():
        if tuple(tensor.shape) != shapes[key]:
            fail(f"{key} has shape {tuple(tensor.shape)}, expected {shapes[key]}")


class AdapterCache:
    """LRU of loaded adapters, bounded by the adapters' tensor bytes. Thread-safe.

    Requests already running keep their adapter alive after it is evicted (they hold a
    reference); the bound is on what the cache itself keeps.
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        # Counted by the engine's lookups (`InferenceEngine.adapter`) and by `put`, for metrics.
        self.hits = 0
        self.misses = 0
        self.evictions = 0  # adapters dropped to make room (not those `evict` removed: deleted)

    def get(self, adapter_id: str) -> LoadedAdapter | None:
        with self._lock:
            adapter = self._entries.get(adapter_id)
            if adapter is not None:
                self._entries.move_to_end(adapter_id)
            return adapter

    def put(self, adapter: LoadedAdapter) -> list[str]:
        """Insert (or replace) ``adapter``; returns the ids evicted to make room."""
        size = adapter.nbytes
        if size > self.max_bytes:
            raise AdapterTooLarge(f"adapter {adapter.adapter_id!r} is {size} bytes, over the adapter cache's {self.max_bytes}")
        with self._lock:
            self._remove(adapter.adapter_id)
            evicted = []
            while self._entries and self._bytes + size > self.max_bytes:
                old_id, _ = next(iter(self._entries.items()))
                self._remove(old_id)
                evicted.append(old_id)
            self.evictions += len(evicted)
            self._entries[adapter.adapter_id] = adapter
            self._bytes += size
            return evicted

    def evict(self, adapter_id: str) -> bool:
        with self._lock:
            return self._remove(adapter_id)

    def _remove(self, adapter_id: str) -> bool:
        adapter = self._entries.pop(adapter_id, None)
        if adapter is None:
            return False
        self._bytes -= adapter.nbytes
        return True

    @property
    def nbytes(self) -> int:
        return self._bytes

    def ids(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)
