"""`AdapterSlots`: the adapters of one base model's running requests, copied into fixed slots of
per-layer tables (`LayerTable`, read by `MultiAdapterLinear`).

A request takes its adapter's slot when it is admitted and gives it back when it ends; an
adapter stays in its slot while no request uses it, until the slot is needed for another
(least recently used first), so a popular adapter is copied in once. The tables grow (rank,
heads, correction rank, layers) when an adapter larger than any before arrives; ``version``
counts those changes, which are the only ones that change a forward pass's shapes (captured
decode steps are keyed by it).
"""

from __future__ import annotations

import itertools

import torch

from .adapters import LoadedAdapter, PackedLayer
from .multi_linear import LayerTable, MultiAdapterLinear


class AdapterSlots:
    def __init__(self, layers: dict[str, MultiAdapterLinear], capacity: int, device: torch.device, dtype: torch.dtype):
        self.layers = layers
        self.capacity = capacity
        self.device = device
        self.dtype = dtype  # the base model's: writes are stored in it
        self.version = 0
        self._adapters: list[LoadedAdapter | None] = [None] * capacity
        self._users = [0] * capacity  # requests holding each slot
        self._last_used = [0] * capacity
        self._clock = itertools.count(1)

    def acquire(self, adapter: LoadedAdapter) -> int | None:
        """The slot of ``adapter`` for one more request (copied in if needed), or None when every
        slot is held by running requests."""
        slot = next((i for i, a in enumerate(self._adapters) if a is adapter), None)
        if slot is None:
            free = [i for i in range(self.capacity) if self._users[i] == 0]
            if not free:
                return None
            # An empty slot first (lowest index, keeping the slots in use dense), else the least recently used.
            slot = min(free, key=lambda i: (self._adapters[i] is not None, self._last_used[i], i))
            self._load(slot, adapter)
        self._users[slot] += 1
        self._last_used[slot] = next(self._clock)
        return slot

    def release(self, slot: int) -> None:
        self._users[slot] -= 1

    @property
    def nbytes(self) -> int:
        return sum(layer.table.nbytes for layer in self.layers.values() if layer.table is not None)

    def _load(self, slot: int, adapter: LoadedAdapter) -> None:
        self._adapters[slot] = None  # until every layer holds the new adapter (a failed copy leaves no half)
        for path, layer in self.layers.items():
            packed = adapter.layers.get(path)
            if packed is None:
                if layer.table is not None:
                    _clear(layer.table, slot)
                continue
            table = self._table_for(layer, packed)
            _clear(table, slot)
            _copy_in(table, slot, packed)
        self._adapters[slot] = adapter

    def _table_for(self, layer: MultiAdapterLinear, packed: PackedLayer) -> LayerTable:
        table = layer.table
        rank, heads, r0, n0 = packed.rank, packed.heads, packed.correction_rank, packed.correction_heads
        if (table is not None and table.rank >= rank and table.heads >= heads and table.correction_rank >= r0
                and table.correction_heads >= n0):
            return table
        d_out, d_in = layer.base_layer.out_features, layer.base_layer.in_features  # a 4-bit weight is stored packed
        grown = LayerTable(
            self.capacity,
            max(rank, table.rank if table else 0), max(heads, table.heads if table else 0),
            max(r0, table.correction_rank if table else 0), max(n0, table.correction_heads if table else 0),
            d_in, d_out, self.device, reads_dtype=table.reads.dtype if table else packed.reads.dtype, writes_dtype=self.dtype,
        )
        if table is not None:  # the adapters already in: re-padded to the new shape
            for slot, adapter in enumerate(self._adapters):
                kept = adapter.layers.get(layer.path) if adapter is not None else None
                if kept is not None:
                    _copy_in(grown, slot, kept)
        layer.table = grown
        self.version += 1
        return grown


def _clear(table: LayerTable, slot: int) -> None:
    table.reads[slot].zero_()
    table.writes[slot].zero_()
    table.bias[slot].fill_(float("-inf"))
    table.bias[slot, 0] = 0.0
    table.bias0[slot].fill_(float("-inf"))
    table.bias0[slot, :1] = 0.0


def _copy_in(table: LayerTable, slot: int, packed: PackedLayer) -> None:
    """``packed`` into ``slot``, zero-padded to the table: reads rows [A | router | A0 | router0]
    at [0, R) | [R, R+NH) | [R+NH, R+NH+R0) | [R+NH+R0, ...), writes columns per head at i*R,
    the correction's heads at NH*R + j*R0."""
    R, NH, R0 = table.rank, table.heads, table.correction_rank
    r, n, nr, r0 = packed.rank, packed.heads, packed.router_rows, packed.correction_rank
    n0, nr0 = packed.correction_heads, packed.correction_router_rows
    if not packed.has_router and n != 1:  # the table weighs heads by a softmax: 1 without a router
        raise ValueError(f"a layer without a router has one head, not {n}")
    if not packed.correction_routed and n0 > 1:
        raise ValueError(f"a correction without an initial router has one head, not {n0}")
    reads, writes = table.reads[slot], table.writes[slot]
    reads[:r] = packed.reads[:r]
    reads[R : R + nr] = packed.reads[r : r + nr]
    reads[R + NH : R + NH + r0] = packed.reads[r + nr : r + nr + r0]
    reads[R + NH + R0 : R + NH + R0 + nr0] = packed.reads[r + nr + r0 :]
    for i in range(n):
        writes[i * R : i * R + r] = packed.writes[:, i * r : (i + 1) * r].T
    for j in range(n0):
        start = n * r + j * r0
        writes[NH * R + j * R0 : NH * R + j * R0 + r0] = packed.writes[:, start : start + r0].T
    table.bias[slot].fill_(float("-inf"))
    table.bias[slot, :n] = 0.0
    table.bias0[slot].fill_(float("-inf"))
    table.bias0[slot, : max(n0, 1)] = 0.0
