"""`MultiAdapterLinear`: one frozen base linear serving a batch whose rows use different adapters.

The engine wraps every linear layer of a served base model once. Before a forward pass,
`BatchPlans` sets each wrapper's `LayerPlan` (when the batch's composition changes, not every
step): the adapters of the batch's rows, padded to common (rank, heads, correction rank) and
gathered per row. The forward is then, for any mix of adapters, two batched matmuls around the base matmul:

    z = bmm(x, reads_row^T)                 # (B, T, R + N + R0)
    H = softmax(z_router + bias_row) * h    # padded heads get bias -inf: weight exactly 0
    y = W x + b + bmm([H; h0], writes_row^T)

Padding is with zeros, so a row's result is the eval-mode `RLoRALinear` function of its own
adapter. A row with no adapter on this layer (plain base model, or an adapter not targeting
it) reads a zero adapter and gets exactly zero added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapter.diagnostics import routing_entropy
from .adapters import LoadedAdapter, PackedLayer


class ForwardContext:
    """Shared by the wrappers of one base model; set by the engine for each forward pass."""

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None  # (B, T) bool: real (non-padding) tokens
        self.record_routing = False


@dataclass
class LayerPlan:
    rank: int  # R: padded rank
    heads: int  # NH: padded head count (1 when no row of the batch has a router here)
    routed: bool  # router rows present in ``reads``
    correction_rank: int  # R0
    batch: int  # B: rows of the batch
    # Per row: reads (B, d_in, K) with K = R + (NH if routed) + R0, writes (B, NH*R + R0, d_out).
    # When every row shares one adapter: 2-D, untransposed, (K, d_in) and (d_out, NH*R + R0).
    reads: torch.Tensor
    writes: torch.Tensor
    bias: torch.Tensor | None  # (B, NH) float32: 0 for real heads, -inf for padding
    weight_sums: torch.Tensor | None = None  # (B, NH) float32, routing being recorded
    entropy_sums: torch.Tensor | None = None  # (B,)
    token_counts: torch.Tensor | None = None  # (B,)


class MultiAdapterLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, path: str, context: ForwardContext):
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.context = context
        self.plan: LayerPlan | None = None

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its projections
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self.plan
        if plan is None:
            return out
        batch = plan.batch
        shape = out.shape
        x3 = x.reshape(batch, -1, x.shape[-1])
        if not torch.is_autocast_enabled(x.device.type):
            x3 = x3.to(plan.reads.dtype)
        shared = plan.reads.dim() == 2  # one adapter for every row
        z = torch.nn.functional.linear(x3, plan.reads) if shared else torch.bmm(x3, plan.reads)  # (B, T, K)
        r, nh, r0 = plan.rank, plan.heads, plan.correction_rank
        h = z[..., :r]
        if plan.routed:
            logits = z[..., r : r + nh].float() + plan.bias.unsqueeze(1)
            weights = torch.softmax(logits, dim=-1)
            if plan.weight_sums is not None and self.context.record_routing:
                self._record(plan, weights)
            heads = h.unsqueeze(-2) * weights.to(h.dtype).unsqueeze(-1)  # (B, T, NH, R)
            stacked = heads.reshape(*h.shape[:-1], nh * r)
            rest = z[..., r + nh :]
        else:
            stacked = h
            rest = z[..., r:]
        if r0:
            stacked = torch.cat([stacked, rest], dim=-1)
        # Added inside the matmul (addmm / baddbmm), as RLoRALinear does: one rounding of the
        # sum in bfloat16, so serving reproduces training-time eval.
        stacked = stacked.to(out.dtype)
        writes = plan.writes.to(out.dtype)
        if shared:
            flat = out.reshape(-1, shape[-1])
            return torch.addmm(flat, stacked.reshape(-1, stacked.shape[-1]), writes.T).view(shape)
        return torch.baddbmm(out.reshape(batch, -1, shape[-1]), stacked, writes).view(shape)

    def _record(self, plan: LayerPlan, weights: torch.Tensor) -> None:
        mask = self.context.token_mask
        mask = torch.ones(weights.shape[:2], device=weights.device) if mask is None else mask.to(weights.device, torch.float32)
        entropy = routing_entropy(weights)  # (B, T)
        plan.weight_sums += (weights * mask.unsqueeze(-1)).sum(1)
        plan.entropy_sums += (entropy * mask).sum(1)
        plan.token_counts += mask.sum(1)


def build_plan(
    path: str,
    slot_layers: list[PackedLayer | None],
    row_slots: list[int],
    shape: tuple[int, int],
    device: torch.device,
    reads_dtype: torch.dtype,
    writes_dtype: torch.dtype,
    record_routing: bool,
) -> LayerPlan | None:
    """The plan of one layer: ``slot_layers`` are the distinct adapters of the batch (None: no
    adapter on this layer), ``row_slots`` each row's slot. None when no row is adapted here."""
    present = [layer for layer in slot_layers if layer is not None]
    if not present:
        return None
    d_out, d_in = shape
    R = max(layer.rank for layer in present)
    routed = any(layer.has_router for layer in present)
    NH = max(layer.heads for layer in present)
    NR = NH if routed else 0
    R0 = max(layer.correction_rank for layer in present)
    reads, writes, biases = [], [], []
    for layer in slot_layers:
        bias = torch.full((NH,), float("-inf"))
        if layer is None:
            bias[0] = 0.0
            reads.append(torch.zeros(R + NR + R0, d_in, dtype=reads_dtype, device=device))
            writes.append(torch.zeros(d_out, NH * R + R0, dtype=writes_dtype, device=device))
            biases.append(bias)
            continue
        bias[: layer.heads] = 0.0
        biases.append(bias)
        native = layer.rank == R and layer.router_rows == NR and layer.heads == NH and layer.correction_rank == R0
        if native:
            reads.append(layer.reads.to(reads_dtype))
            writes.append(layer.writes.to(writes_dtype))
            continue
        r, n, nr, r0 = layer.rank, layer.heads, layer.router_rows, layer.correction_rank
        padded_reads = torch.zeros(R + NR + R0, d_in, dtype=reads_dtype, device=device)
        padded_reads[:r] = layer.reads[:r]
        padded_reads[R : R + nr] = layer.reads[r : r + nr]
        padded_reads[R + NR : R + NR + r0] = layer.reads[r + nr :]
        padded_writes = torch.zeros(d_out, NH * R + R0, dtype=writes_dtype, device=device)
        for i in range(n):
            padded_writes[:, i * R : i * R + r] = layer.writes[:, i * r : (i + 1) * r]
        padded_writes[:, NH * R : NH * R + r0] = layer.writes[:, n * r :]
        reads.append(padded_reads)
        writes.append(padded_writes)
    batch = len(row_slots)
    if len(slot_layers) == 1:  # one adapter for the whole batch: shared 2-D weights, plain matmuls
        row_reads, row_writes = reads[0], writes[0]
        row_bias = biases[0].to(device).unsqueeze(0).expand(batch, -1)
    else:
        index = torch.tensor(row_slots, device=device)
        # Stored transposed, (B, d_in, K) and (B, K', d_out), the layout bmm reads fastest.
        row_reads = torch.stack(reads).index_select(0, index).transpose(1, 2).contiguous()
        row_writes = torch.stack(writes).index_select(0, index).transpose(1, 2).contiguous()
        row_bias = torch.stack(biases).to(device).index_select(0, index)
    plan = LayerPlan(
        rank=R, heads=NH, routed=routed, correction_rank=R0, batch=batch,
        reads=row_reads, writes=row_writes, bias=row_bias if routed else None,
    )
    if routed and record_routing:
        plan.weight_sums = torch.zeros(batch, NH, device=device)
        plan.entropy_sums = torch.zeros(batch, device=device)
        plan.token_counts = torch.zeros(batch, device=device)
    return plan


def wrap_linears(model: nn.Module, context: ForwardContext) -> dict[str, MultiAdapterLinear]:
    """Replace every `nn.Linear` of ``model`` by a `MultiAdapterLinear`, in place."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    wrapped = {}
    for name, linear in linears:
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = MultiAdapterLinear(linear, name, context)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


__all__ = ["ForwardContext", "LayerPlan", "MultiAdapterLinear", "build_plan", "wrap_linears"]


class BatchPlans:
    """The plans of every wrapped layer of one base model for the rows of a batch, and the
    routing those plans record, moved into the rows.

    A row has ``adapter`` (a `LoadedAdapter` or None) and ``wants_routing``; a row that wants
    routing also has ``routing``, its totals per layer path: ``[head weight sums, entropy sum,
    tokens]`` (what `rlora.adapter.diagnostics.routing_from_totals` reports on)."""

    def __init__(self, layers: dict[str, MultiAdapterLinear], linear_shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype):
        self.layers = layers
        self.linear_shapes = linear_shapes
        self.device = device
        self.dtype = dtype
        self._rows: list | None = None  # the rows the plans were built for

    def set(self, rows: list) -> None:
        """Build every layer's plan for ``rows`` (a no-op when already built for them)."""
        if self._rows is not None and len(self._rows) == len(rows) and all(a is b for a, b in zip(self._rows, rows)):
            return
        self.flush_routing()
        self._rows = list(rows)
        adapters = [row.adapter for row in rows]
        if not rows or all(a is None for a in adapters):
            for layer in self.layers.values():
                layer.plan = None
            return
        slots: list[LoadedAdapter | None] = []  # the batch's distinct adapters
        row_slots = []
        for adapter in adapters:
            for index, known in enumerate(slots):
                if known is adapter:
                    break
            else:
                index = len(slots)
                slots.append(adapter)
            row_slots.append(index)
        record = any(row.wants_routing for row in rows)
        for path, layer in self.layers.items():
            slot_layers = [None if a is None else a.layers.get(path) for a in slots]
            layer.plan = build_plan(
                path, slot_layers, row_slots, self.linear_shapes[path], self.device,
                reads_dtype=_reads_dtype(slot_layers), writes_dtype=self.dtype, record_routing=record,
            )

    def flush_routing(self) -> None:
        """Move the routing sums of the current plans into their rows."""
        rows = self._rows
        if not rows or not any(row.wants_routing for row in rows):
            return
        for path, layer in self.layers.items():
            plan = layer.plan
            if plan is None or plan.weight_sums is None:
                continue
            sums, entropy, counts = plan.weight_sums.cpu(), plan.entropy_sums.cpu(), plan.token_counts.cpu()
            for i, row in enumerate(rows):
                if not row.wants_routing:
                    continue
                packed = row.adapter.layers.get(path)
                if packed is None or not packed.has_router or counts[i] == 0:
                    continue
                totals = row.routing.setdefault(path, [torch.zeros(packed.heads), 0.0, 0])
                totals[0] += sums[i, : packed.heads]
                totals[1] += float(entropy[i])
                totals[2] += int(counts[i])
            plan.weight_sums.zero_()
            plan.entropy_sums.zero_()
            plan.token_counts.zero_()


def _reads_dtype(slot_layers: list[PackedLayer | None]) -> torch.dtype:
    for layer in slot_layers:
        if layer is not None:
            return layer.reads.dtype
    return torch.float32
