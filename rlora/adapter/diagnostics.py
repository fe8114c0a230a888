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


def initial_heads(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every multi-head layer's heads ``B`` as they are now: taken right after
    `attach`, the ``B(0)`` that `update_similarity` measures the learned update from."""
    return {name: layer.lora_B.detach().clone() for name, layer in adapter_layers(model).items() if layer.heads > 1}


def update_similarity(model: nn.Module, initial: Mapping[str, torch.Tensor] | None = None) -> dict:
    """`head_similarity` of the learned updates ``B_i - B_i(0)`` rather than of the raw heads.

    Random initial heads are nearly orthogonal, so the raw similarity of R-LoRA's heads is low
    whether or not training made them differ; the update's similarity says whether training
    moved the heads alike. ``initial`` maps layer paths to ``B(0)`` (`initial_heads`); without
    it, ``B(0)`` is the frozen copy a routed correction keeps, or zero for heads that start at
    zero; a layer whose ``B(0)`` is unknown (a zero-router adapter keeps only the mean initial
    head) is left out. ``per_module`` averages the layers by module name (``down_proj``).
    """
    per_layer = {}
    for name, layer in adapter_layers(model).items():
        if layer.heads < 2:
            continue
        start = None if initial is None else initial.get(name)
        if start is None:
            if layer.lora_B0 is None:
                start = torch.zeros_like(layer.lora_B)
            elif layer.lora_B0.dim() == 3:
                start = layer.lora_B0
            else:
                continue
        update = layer.lora_B.detach().float() - start.to(layer.lora_B.device, torch.float32)
        per_layer[name] = pairwise_cosine_mean(update.flatten(1))
    return {"per_layer": per_layer, "per_module": _by_module(per_layer), "mean": _mean(per_layer.values())}


def _by_module(per_layer: Mapping[str, float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for name, value in per_layer.items():
        groups.setdefault(name.rpartition(".")[2], []).append(value)
    return {module: _mean(values) for module, values in groups.items()}


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


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
        self._top_head_counts: dict[RLoRALinear, torch.Tensor] = {}

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
        top = torch.bincount(flat.argmax(-1), minlength=flat.shape[-1]).cpu()
        self._top_head_counts[layer] = self._top_head_counts.get(layer, 0) + top

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


def mutual_information(counts: torch.Tensor) -> float:
    """Mutual information (nats) of the two variables of a joint count table (rows x columns),
    e.g. task x top head: 0 when routing ignores the task, ln(min(rows, columns)) at most."""
    joint = counts.double() / counts.sum()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    present = joint > 0
    return float((joint[present] * (joint[present] / outer[present]).log()).sum())


def routing_by_task(model: nn.Module, batches_by_task: Mapping[str, Iterable[dict]]) -> dict:
    """How routing separates tasks, over each task's batches of model inputs.

    Per routed layer: each task's mean head weights, its share of tokens whose top head is
    each head, and the mutual information (nats) between task and top head over all tokens
    (0: the router ignores the task; ``max_mutual_information`` = ln(min(tasks, heads)): every
    task has heads of its own). ``mean_mutual_information`` averages the layers.
    """
    names = {layer: name for name, layer in adapter_layers(model).items()}
    tasks = list(batches_by_task)
    recorders = {task: _record_batches(model, batches) for task, batches in batches_by_task.items()}
    per_layer = {}
    for layer, name in names.items():
        if layer.router is None or not all(layer in recorders[t]._tokens for t in tasks):
            continue
        counts = torch.stack([recorders[t]._top_head_counts[layer] for t in tasks])
        per_layer[name] = {
            "mean_weight": {
                t: [round(float(v), 6) for v in recorders[t]._weight_sums[layer] / recorders[t]._tokens[layer]] for t in tasks
            },
            "top_head_share": {
                t: [round(float(v), 6) for v in counts[i] / counts[i].sum().clamp_min(1)] for i, t in enumerate(tasks)
            },
            "mutual_information": mutual_information(counts) if counts.sum() else 0.0,
        }
    heads = max((layer.heads for layer in names if layer.router is not None), default=1)
    return {
        "tasks": tasks,
        "per_layer": per_layer,
        "mean_mutual_information": _mean(v["mutual_information"] for v in per_layer.values()),
        "max_mutual_information": math.log(max(min(len(tasks), heads), 1)),
    }


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


def routing_summary(model: nn.Module, batches: Iterable[dict]) -> dict:
    """Routing over ``batches`` of model inputs (``input_ids`` and optional ``attention_mask``)."""
    names = {layer: name for name, layer in adapter_layers(model).items()}
    return _record_batches(model, batches).summary(names)


@torch.no_grad()
def _record_batches(model: nn.Module, batches: Iterable[dict]) -> RoutingRecorder:
    """The routing of ``batches``, in eval mode, padding left out."""
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
    return recorder
