"""`RLoRALinear`: one frozen `nn.Linear` plus an R-LoRA-family adapter.

One class serves every method of the paper and both ablations; `AdapterConfig` decides which
parts exist (router, frozen init correction) and where dropout goes (on the input, or per head
on the rank-r intermediate). docs/design.md section 1 gives the formulas; the forward pass below is
the fused form (`FusedAdapter`): one matmul for everything that reads ``x``, one for everything
that writes the output, no loop over heads, and a backward that saves only rank-r tensors.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .. import kernels
from .config import AdapterConfig
from .fused import FusedAdapter

RoutingObserver = Callable[["RLoRALinear", torch.Tensor], None]


class RLoRALinear(nn.Module):
    """``y = W x + b + s * sum_i w_i B_i h_i - s * sum_i w0_i B0_i (A0 x)``, with ``h = A x``,
    ``w = softmax(W_r x)`` and ``w0 = softmax(W_r0 x)``.

    Parameters: ``lora_A`` (r, d_in), ``lora_B`` (N, d_out, r), ``router`` (N, d_in) or None.
    Buffers, present only when the heads start non-zero: ``lora_A0`` (r, d_in), ``router0``
    (N, d_in) and ``lora_B0`` (N, d_out, r), frozen copies of the initial A, router and heads.
    They cancel the initial update, so the adapted layer starts exactly at the base layer
    without touching ``W``, which other adapters share. With ``router_init="zero"`` every head
    weighs exactly 1/N at the start, so the correction needs no router: ``router0`` is None and
    ``lora_B0`` is the mean initial head (d_out, r), as in adapter format version 1.
    """

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.config = config
        d_out, d_in = base_layer.out_features, base_layer.in_features  # a 4-bit weight is stored packed
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
        lora_A0 = router0 = lora_B0 = None  # registered as None buffers when absent
        if config.uses_random_init:
            lora_A0 = lora_A.clone().to(device)
            if config.routes_correction:
                router0, lora_B0 = self.router.detach().clone(), lora_B.clone().to(device)
            else:
                lora_B0 = lora_B.mean(dim=0).to(device)
        self.register_buffer("lora_A0", lora_A0)
        self.register_buffer("router0", router0)
        self.register_buffer("lora_B0", lora_B0)
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
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else self.lora_A.dtype
        p = self.dropout if self.training else 0.0

        # Dropout: per head on the rank-r intermediate for rlora (bool keep masks, a byte per
        # entry kept for backward), on the input for lora, hydralora and rlora without MD
        # (dropout's own fused kernel each way, keeping a bool mask on every device). One draw
        # per forward in a fixed order, so a resumed run replays them from the saved RNG state.
        # With the Triton kernels (rlora.kernels: on CUDA) multi-head dropout draws a seed, and
        # the kernels draw the masks from it forward and again backward.
        input_dropout = p > 0 and not self.multi_head_dropout
        use_kernels = not input_dropout and kernels.enabled(x)
        x_dropped = head_keep = dropout_seed = None
        if p > 0 and self.multi_head_dropout and use_kernels:
            dropout_seed = torch.randint(0, 2**62, (1,), device=x.device)
        elif p > 0 and self.multi_head_dropout:
            head_keep = torch.empty((*x.shape[:-1], self.heads, self.rank), dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
        elif input_dropout:
            x_dropped, _ = torch.native_dropout(x, p, True)

        out, weights = FusedAdapter.apply(
            x, x_dropped, result, self.lora_A, self.lora_B, self.router, self.lora_A0, self.router0,
            self.lora_B0, head_keep, 1.0 - p, self.scaling, compute_dtype, dropout_seed, use_kernels,
        )
        if self.routing_observer is not None and weights is not None:
            self.routing_observer(self, weights.to(compute_dtype).view(*x.shape[:-1], self.heads))
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, method={self.config.method}, "
            f"heads={self.heads}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}, "
            f"multi_head_dropout={self.multi_head_dropout}, correction={self.has_correction}, "
            f"routed_correction={self.router0 is not None}"
        )


def _initial_router(config: AdapterConfig, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform, like ``nn.Linear`` and HydraLoRA's and R-LoRA's reference code, for
    every method: the frozen correction keeps the start exact whatever the router. Zero with
    ``router_init="zero"`` (random heads only, see `AdapterConfig`): every head then weighs
    exactly 1/N at step 0."""
    router = torch.zeros(config.heads, d_in)
    if config.router_init == "kaiming":
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
