"""`RLoRALinear`: one frozen `nn.Linear` plus an R-LoRA-family adapter.

One class serves every method of the paper and both ablations; `AdapterConfig` decides which
parts exist (router, frozen init correction) and where dropout goes (on the input, or per head
on the rank-r intermediate). docs/design.md section 1 gives the formulas; the forward pass below is
the fused form: one matmul for everything that reads ``x``, one for everything that writes the
output, no loop over heads.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig

RoutingObserver = Callable[["RLoRALinear", torch.Tensor], None]


class RLoRALinear(nn.Module):
    """``y = W x + b + s * sum_i w_i B_i h_i - s * B0 (A0 x)``, with ``h = A x``.

    Parameters: ``lora_A`` (r, d_in), ``lora_B`` (N, d_out, r), ``router`` (N, d_in) or None.
    Buffers: ``lora_A0`` (r, d_in) and ``lora_B0`` (d_out, r), frozen copies of the initial A
    and of the mean initial head, present only when the heads start non-zero: they cancel the
    initial update, so the adapted layer starts exactly at the base layer without touching
    ``W``, which other adapters share.
    """

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.config = config
        d_out, d_in = base_layer.weight.shape
        self.in_features, self.out_features = d_in, d_out
        self.heads, self.rank = config.heads, config.rank
        self.scaling = config.scaling
        self.dropout = config.dropout
        self.multi_head_dropout = config.uses_multi_head_dropout
        # Set by diagnostics while recording routing; called with the head weights.
        self.routing_observer: RoutingObserver | None = None

        lora_A, lora_B = _initial_weights(config, d_in, d_out, generator)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(lora_A.to(device))
        self.lora_B = nn.Parameter(lora_B.to(device))
        self.router = nn.Parameter(_initial_router(config, d_in, generator).to(device)) if config.has_router else None
        if config.uses_random_init:
            self.register_buffer("lora_A0", lora_A.clone().to(device))
            self.register_buffer("lora_B0", lora_B.mean(dim=0).to(device))
        else:
            self.lora_A0 = None
            self.lora_B0 = None
        self.train(base_layer.training)  # join the model in its current mode

    @property
    def weight(self) -> torch.Tensor:  # model code that reads a projection's weight (dtype, device)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def has_correction(self) -> bool:
        return self.lora_A0 is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        r, n = self.rank, self.heads
        p = self.dropout if self.training else 0.0

        # 1. Everything that reads x, in one matmul: z = [A; W_r; A0] x. With input dropout
        #    (lora, hydralora, rlora without MD) A reads the dropped x and needs its own matmul;
        #    the router and the correction always read the undropped x.
        input_dropout = p > 0 and not self.multi_head_dropout
        reads_x = [self.lora_A] if not input_dropout else []
        if self.router is not None:
            reads_x.append(self.router)
        if self.has_correction:
            reads_x.append(self.lora_A0)
        z = F.linear(x, torch.cat(reads_x)) if reads_x else None
        if input_dropout:
            h = F.linear(F.dropout(x, p, training=True), self.lora_A)
        else:
            h, z = z[..., :r], z[..., r:]

        # 2. Per-head intermediates H_i = w_i * m_i * h, laid side by side: (..., N*r).
        heads = h.unsqueeze(-2)  # (..., 1, r), broadcast over heads
        if p > 0 and self.multi_head_dropout:
            heads = heads * self.head_dropout_mask(h)
        if self.router is not None:
            weights = torch.softmax(z[..., :n].float(), dim=-1).to(h.dtype)
            if self.routing_observer is not None:
                self.routing_observer(self, weights.detach())
            heads = heads * weights.unsqueeze(-1)
        stacked = heads.expand(*h.shape[:-1], n, r).reshape(*h.shape[:-1], n * r)

        # 3. Everything that writes the output, in one matmul: s * [B_1 .. B_N | -B0] [H; h0].
        writes = self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r)
        if self.has_correction:
            stacked = torch.cat([stacked, z[..., -r:].to(stacked.dtype)], dim=-1)
            writes = torch.cat([writes, -self.lora_B0], dim=1)
        # addmm adds into the base output in the same BLAS call: no full-width temporary.
        flat = result.reshape(-1, self.out_features)
        delta_in = stacked.reshape(-1, stacked.shape[-1]).to(flat.dtype)
        out = torch.addmm(flat, delta_in, (writes * self.scaling).to(flat.dtype).T)
        return out.view(result.shape)

    def head_dropout_mask(self, h: torch.Tensor) -> torch.Tensor:
        """Independent inverted-dropout masks for every head and token, in one draw: (..., N, r).

        Float32 whatever ``h`` is: 1/(1-p) is rarely a bfloat16 number (1/0.9 would become
        1.109), and a mask that is systematically low would shrink the adapter in training
        against eval."""
        keep = 1.0 - self.dropout
        mask = torch.empty(*h.shape[:-1], self.heads, self.rank, dtype=torch.float32, device=h.device)
        return mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, method={self.config.method}, "
            f"heads={self.heads}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}, "
            f"multi_head_dropout={self.multi_head_dropout}, correction={self.has_correction}"
        )


def _initial_router(config: AdapterConfig, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """Zero when the heads start random: every head then weighs exactly 1/N at step 0, which
    the frozen correction assumes. With zero heads the start is exact whatever the router, and
    a zero router there would leave the heads' gradients identical forever (the same input, the
    same 1/N weight), so it starts as HydraLoRA's reference does: Kaiming-uniform, like
    ``nn.Linear``."""
    router = torch.zeros(config.heads, d_in)
    if not config.uses_random_init:
        nn.init.kaiming_uniform_(router, a=math.sqrt(5), generator=generator)
    return router


def _initial_weights(config: AdapterConfig, d_in: int, d_out: int, generator: torch.Generator):
    """A (r, d_in) and B (N, d_out, r) as the paper's Table 1 says, in float32 on the CPU."""
    r, n = config.rank, config.heads
    if config.uses_random_init:
        c = config.head_init_scale(d_out)
        lora_A = torch.randn(r, d_in, generator=generator) * (c / math.sqrt(d_in))
        lora_B = torch.randn(n, d_out, r, generator=generator) * (c / math.sqrt(d_out))
    else:
        lora_A = torch.empty(r, d_in)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)  # as PEFT
        lora_B = torch.zeros(n, d_out, r)
    return lora_A, lora_B
