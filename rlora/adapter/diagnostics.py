"""What the service reports about an adapter: how different its heads are, and how it routes."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .layer import RLoRALinear
from .inject import adapter_layers


def head_similarity(model: nn.Module) -> dict:
    """Mean pairwise cosine similarity of the flattened heads ``B_i``, per layer and overall.

    Paper sections 3 and 5.4: HydraLoRA's heads sit near 0.8, R-LoRA's below 0.7. Two all-zero
    heads (HydraLoRA at step 0) are identical, so they count as similarity 1. Single-head
    adapters have no pairs and are left out; ``mean`` is None when no layer has pairs.
    """
    per_layer = {}
    for name, layer in adapter_layers(model).items():
        if layer.heads > 1:
            per_layer[name] = pairwise_cosine_mean(layer.lora_B.detach().float().flatten(1))
    mean = sum(per_layer.values()) / len(per_layer) if per_layer else None
    return {"per_layer": per_layer, "mean": mean}


def pairwise_cosine_mean(vectors: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows; zero rows are equal to each other only."""
    norms = vectors.norm(dim=1)
    zero = norms == 0
    unit = vectors / norms.clamp_min(torch.finfo(vectors.dtype).tiny).unsqueeze(1)
    cosine = unit @ unit.T
    cosine = torch.where(zero[:, None] & zero[None, :], torch.ones_like(cosine), cosine)
    n = vectors.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=vectors.device)
    return float(cosine[off_diagonal].mean())


class RoutingRecorder:
    """Accumulates head weights per adapted layer while it is installed (see `record_routing`).

    ``token_mask`` (flattened like the tokens, True for real tokens) leaves padding out; set it
    before each forward pass of a padded batch.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self._weight_sums: dict[RLoRALinear, torch.Tensor] = {}
        self._entropy_sums: dict[RLoRALinear, float] = {}
        self._tokens: dict[RLoRALinear, int] = {}

    def __call__(self, layer: RLoRALinear, weights: torch.Tensor) -> None:
        flat = weights.reshape(-1, weights.shape[-1]).float()
        if self.token_mask is not None:
            if self.token_mask.numel() != flat.shape[0]:
                raise ValueError(f"token_mask has {self.token_mask.numel()} entries for {flat.shape[0]} routed tokens")
            flat = flat[self.token_mask.reshape(-1).to(flat.device)]
        entropy = routing_entropy(flat)
        self._weight_sums[layer] = self._weight_sums.get(layer, 0) + flat.sum(0)
        self._entropy_sums[layer] = self._entropy_sums.get(layer, 0.0) + float(entropy.sum())
        self._tokens[layer] = self._tokens.get(layer, 0) + flat.shape[0]

    def summary(self, names: dict[RLoRALinear, str]) -> dict:
        """`routing_from_totals` of what was recorded, layers named by ``names``."""
        return routing_from_totals(
            {names[layer]: (self._weight_sums[layer], self._entropy_sums[layer], count) for layer, count in self._tokens.items()}
        )


def routing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of each token's head weights ``(..., N)``: shape ``(...)``."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1)


def routing_from_totals(totals: Mapping[str, tuple[torch.Tensor, float, int]]) -> dict:
    """The routing report from per-layer totals ``name -> (head weight sums (N,), entropy sum,
    tokens)``: per layer the mean weight of each head and the mean routing entropy (nats; at
    most ``max_entropy`` = ln N), and the mean entropy over layers. Layers without tokens are
    left out; ``mean_entropy`` is None when no layer is left."""
    per_layer = {}
    for name, (weight_sums, entropy_sum, count) in totals.items():
        if count:
            per_layer[name] = {
                "mean_weight": [round(float(v), 6) for v in weight_sums / count],
                "entropy": entropy_sum / count,
                "max_entropy": math.log(weight_sums.shape[0]),
                "tokens": count,
            }
    mean_entropy = sum(v["entropy"] for v in per_layer.values()) / len(per_layer) if per_layer else None
    return {"per_layer": per_layer, "mean_entropy": mean_entropy}


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecorder]:
    """Install a `RoutingRecorder` on every routed layer for the duration of the block."""
    recorder = RoutingRecorder()
    layers = [layer for layer in adapter_layers(model).values() if layer.router is not None]
    for layer in layers:
        layer.routing_observer = recorder
    try:
        yield recorder
    finally:
        for layer in layers:
            layer.routing_observer = None


@torch.no_grad()
def routing_summary(model: nn.Module, batches: Iterable[dict]) -> dict:
    """Routing over ``batches`` of model inputs (``input_ids`` and optional ``attention_mask``)."""
    names = {layer: name for name, layer in adapter_layers(model).items()}
    was_training = model.training
    model.eval()
    try:
        with record_routing(model) as recorder:
            for batch in batches:
                recorder.token_mask = batch.get("attention_mask")
                if recorder.token_mask is not None:
                    recorder.token_mask = recorder.token_mask.bool()
                model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    finally:
        model.train(was_training)
    return recorder.summary(names)
