"""`MultiAdapterLinear`: one frozen base linear serving a batch whose rows use different adapters,
read from preallocated slot tables (as S-LoRA and Punica do).

The adapters of the running requests sit in `AdapterSlots` (``slots.py``): per adapted layer a
``reads`` table (S, K, d_in) and a ``writes`` table (S, W, d_out), every adapter padded with zeros
to the table's rank R, head count NH, correction rank R0 and correction head count NH0
(K = R + NH + R0 + NH0, W = NH*R + NH0*R0).
Each row of a batch carries a slot index and an on/off flag (off: the plain base model), so a
batch with other adapters in it changes tensor *data*, never shapes: a captured decode step
replays for any mix of adapters. With ``z = x reads_slot^T``:

    h = z[:R]; w = softmax(z[R:R+NH] + bias_slot); h0 = z[R+NH:R+NH+R0]
    w0 = softmax(z[R+NH+R0:] + bias0_slot)
    y = W x + b + on * [w_1 h; ..; w_NH h; w0_1 h0; ..; w0_NH0 h0] writes_slot

The frozen init correction is a second set of heads: weighed by the initial router (N heads),
or one head of weight 1 (the mean initial head of a zero-router adapter: a zero router row
and bias 0, so softmax gives it 1).

For the whole batch this is one matmul against the first S' slots' reads (S' = slots in use,
bucketed), a gather of each row's part, and one matmul against the S' slots' writes with each
row's input placed in its slot's columns (zeros elsewhere): the weights read grow with the
adapters in the batch, not with the rows (the flops with both; both are small beside the base
matmul). Padding is with zeros and the padded heads' bias is -inf, so a row's result is the
eval-mode `RLoRALinear` function of its own adapter.

On CUDA (`rlora.kernels`) the same delta runs as two Triton kernels instead, punica-style: a
"shrink" of every row against its own slot and an "expand" with the router softmax inside, added
into the base output in place (`rlora.kernels.multi_adapter`); a step that records routing keeps
the PyTorch path.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..adapter.diagnostics import routing_entropy


class ForwardContext:
    """Shared by the wrappers of one base model; set by the runner before each forward pass."""

    def __init__(self) -> None:
        self.row_slots: torch.Tensor | None = None  # (B,) long: each row's adapter slot
        self.row_on: torch.Tensor | None = None  # (B,) float: 1 where the row has an adapter; None: every row has one
        self.slots_used = 0  # S': the forward reads slots [0, S'); 0: no adapter in the batch
        self.token_mask: torch.Tensor | None = None  # (B, T) bool: real tokens (routing records)
        self.routing: dict[str, list[torch.Tensor]] | None = None  # path -> [weight sums (B, NH), entropy sums (B,), tokens (B,)]


class LayerTable:
    """The slot tables of one adapted layer (see the module docstring)."""

    def __init__(self, slots: int, rank: int, heads: int, correction_rank: int, correction_heads: int, d_in: int,
                 d_out: int, device: torch.device, reads_dtype: torch.dtype, writes_dtype: torch.dtype):
        if (correction_rank > 0) != (correction_heads > 0):
            raise ValueError(f"a correction has a rank and heads, got rank {correction_rank}, {correction_heads} heads")
        self.rank, self.heads, self.correction_rank, self.correction_heads = rank, heads, correction_rank, correction_heads
        k = rank + heads + correction_rank + correction_heads
        w = heads * rank + correction_heads * correction_rank
        self.reads = torch.zeros(slots, k, d_in, dtype=reads_dtype, device=device)
        self.writes = torch.zeros(slots, w, d_out, dtype=writes_dtype, device=device)
        # An empty slot: one head of weight 1 reading zeros, the same for the correction.
        self.bias = torch.full((slots, heads), float("-inf"), device=device)
        self.bias[:, 0] = 0.0
        self.bias0 = torch.full((slots, correction_heads), float("-inf"), device=device)
        self.bias0[:, :1] = 0.0
        # Slot 0 alone (every adapted row on it), as views made once: a forward reads them as they are.
        self.first_reads, self.first_writes = self.reads[0], self.writes[0]
        self.first_bias, self.first_bias0 = self.bias[0], self.bias0[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.reads, self.writes, self.bias, self.bias0))


class MultiAdapterLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, path: str, context: ForwardContext):
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.context = context
        self.table: LayerTable | None = None  # None while no slotted adapter adapts this layer

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
        table, context = self.table, self.context
        used = context.slots_used
        if table is None or used == 0:
            return out
        batch = context.row_slots.shape[0]
        shape = out.shape
        x3 = x.reshape(batch, -1, x.shape[-1])
        if not torch.is_autocast_enabled(x.device.type):
            x3 = x3.to(table.reads.dtype)
        if context.routing is None and kernels.enabled(x):
            return self._forward_kernels(out, x3, table)
        r, nh, r0 = table.rank, table.heads, table.correction_rank
        k = table.reads.shape[1]
        if used == 1:  # every adapted row on slot 0: plain matmuls
            z = torch.nn.functional.linear(x3, table.first_reads)  # (B, T, K)
            bias, bias0 = table.first_bias, table.first_bias0
        else:
            z_all = torch.nn.functional.linear(x3, table.reads[:used].reshape(used * k, -1))  # (B, T, S'*K)
            index = context.row_slots.view(batch, 1, 1, 1).expand(batch, z_all.shape[1], 1, k)
            z = z_all.view(batch, -1, used, k).gather(2, index).squeeze(2)
            bias = table.bias.index_select(0, context.row_slots).unsqueeze(1)  # (B, 1, NH)
            bias0 = table.bias0.index_select(0, context.row_slots).unsqueeze(1)  # (B, 1, NH0)
        h = z[..., :r]
        weights = torch.softmax(z[..., r : r + nh].float() + bias, dim=-1)
        if context.routing is not None:
            self._record(weights)
        heads = h.unsqueeze(-2) * weights.to(h.dtype).unsqueeze(-1)  # (B, T, NH, R)
        parts = [heads.flatten(-2)]
        if r0:  # the correction's heads, weighed by the initial router (float32, as RLoRALinear)
            weights0 = torch.softmax(z[..., r + nh + r0 :].float() + bias0, dim=-1)
            parts.append((z[..., r + nh : r + nh + r0].float().unsqueeze(-2) * weights0.unsqueeze(-1)).flatten(-2).to(h.dtype))
        stacked = torch.cat(parts, dim=-1)
        # Rows without an adapter add exactly zero; then the sum is added inside the matmul
        # (addmm), as RLoRALinear does: one rounding in bfloat16, so serving reproduces eval.
        if context.row_on is not None:  # a where, not a product: 0 * inf would be NaN
            stacked = torch.where(context.row_on.view(batch, 1, 1) > 0, stacked, 0.0)
        stacked = stacked.to(out.dtype)
        w = stacked.shape[-1]
        if used == 1:
            writes = table.first_writes
        else:
            spread = stacked.new_zeros(batch, stacked.shape[1], used, w)
            spread.scatter_(2, context.row_slots.view(batch, 1, 1, 1).expand(batch, stacked.shape[1], 1, w), stacked.unsqueeze(2))
            stacked, writes = spread, table.writes[:used].reshape(used * w, -1)
        flat = out.reshape(-1, shape[-1])
        return torch.addmm(flat, stacked.reshape(flat.shape[0], -1), writes.to(out.dtype)).view(shape)

    def _forward_kernels(self, out: torch.Tensor, x3: torch.Tensor, table: LayerTable) -> torch.Tensor:
        """The same delta through the Triton kernels (`rlora.kernels.multi_adapter`): one launch
        to shrink against every row's slot, one to expand into ``out`` in place."""
        from ..kernels.multi_adapter import expand_, shrink

        context = self.context
        slots = context.row_slots if context.row_on is None else torch.where(context.row_on > 0, context.row_slots, -1)
        row_tokens = x3.shape[1]
        z = shrink(x3.reshape(-1, x3.shape[-1]), table.reads, slots, row_tokens)
        expand_(out.view(-1, out.shape[-1]), z, table.writes, table.bias, table.bias0, slots, row_tokens,
                table.rank, table.heads, table.correction_rank, table.correction_heads)
        return out

    def _record(self, weights: torch.Tensor) -> None:
        mask = self.context.token_mask
        mask = torch.ones(weights.shape[:2], device=weights.device) if mask is None else mask.to(weights.device, torch.float32)
        totals = self.context.routing.get(self.path)
        sums = [(weights * mask.unsqueeze(-1)).sum(1), (routing_entropy(weights) * mask).sum(1), mask.sum(1)]
        if totals is None:
            self.context.routing[self.path] = sums
        else:
            for total, add in zip(totals, sums):
                total += add


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
