"""How much memory one device needs to train a run, before it is queued.

The parts of the peak, each from the model's shapes (a meta-device model: nothing loaded):

* the frozen weights: the decoder's linear layers in their stored form (the compute dtype, or
  NF4's 4 bits plus 0.127 bits of double-quantized block scales a weight, or int8's byte plus a
  float32 scale a row, as bitsandbytes stores them); the rest (embeddings, norms, output layer)
  in the compute dtype;
* the adapter (float32 parameters and frozen buffers), its gradients and AdamW's two moments;
* the activations autograd keeps for backward for ``batch_size x max_seq_len`` tokens: per decoder
  layer the inputs of its matmuls, norms and attention in the compute dtype and the adapter's
  rank-sized intermediates, or with gradient checkpointing one layer input a layer plus one
  layer's activations recomputed at a time; and the output layer's float32 logits of every
  position (the worst case: an answer as long as the sequence) with the cross-entropy's copy.

It is an estimate to refuse what cannot fit, not an allocator: tests/test_memory_estimate.py
checks it against what a step on the CPU actually keeps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..adapter.config import AdapterConfig
from .config import TrainingSettings

NF4_BITS_PER_WEIGHT = 4 + 0.127  # QLoRA's double quantization: 8-bit scales of 64-weight blocks, themselves scaled
# Per decoder-layer token, in compute-dtype values: the norms' inputs and outputs (4 x hidden),
# q/k/v and the attention output (hidden + 2 kv + hidden), o_proj's input, and the MLP's inputs
# and outputs (hidden in; gate, up, their product and the activation: 4 x intermediate).
HIDDEN_VALUES_PER_LAYER = 7
INTERMEDIATE_VALUES_PER_LAYER = 4


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    adapter: int  # parameters, frozen buffers, gradients and the optimizer's state
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def estimate_training_memory(model, adapter: AdapterConfig, training: TrainingSettings, *, on_cuda: bool) -> MemoryEstimate:
    """Peak bytes on the device training ``model`` (a meta-device model of the base, see
    `rlora.training.limits`) with ``adapter`` and ``training``; ``on_cuda`` decides the compute
    dtype as the trainer does (bfloat16 autocast on CUDA unless float32 is asked for)."""
    from torch import nn

    from ..adapter.inject import target_linears
    from .limits import adapter_frozen_values, adapter_trainable_parameters

    value = 2 if on_cuda and training.precision != "float32" else 4
    config = model.config
    layers = list(getattr(getattr(model, "model", model), "layers", []))
    decoder_linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    quantized_params = sum(m.in_features * m.out_features for m in decoder_linears) if training.quantization != "none" else 0
    other_params = sum(p.numel() for p in model.parameters()) - quantized_params
    if training.quantization == "nf4":
        quantized_bytes = quantized_params * NF4_BITS_PER_WEIGHT / 8
    elif training.quantization == "int8":
        quantized_bytes = quantized_params + 4 * sum(m.out_features for m in decoder_linears)
    else:
        quantized_bytes = 0
    weights = int(quantized_bytes) + other_params * value

    targets = target_linears(model, adapter)
    shapes = [model.get_submodule(path) for path in targets]
    trainable = sum(adapter_trainable_parameters(adapter, m.in_features, m.out_features) for m in shapes)
    frozen = sum(adapter_frozen_values(adapter, m.in_features, m.out_features) for m in shapes)
    adapter_bytes = 4 * (4 * trainable + frozen)  # float32: weights, gradients and AdamW's two moments; the buffers

    tokens = training.batch_size * training.max_seq_len
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (getattr(config, "head_dim", None) or hidden // heads)
    per_layer = value * (HIDDEN_VALUES_PER_LAYER * hidden + 2 * kv + INTERMEDIATE_VALUES_PER_LAYER * intermediate)
    # The adapter's own saved tensors per target: h (r, compute dtype), the router's N float32
    # weights and the multi-head dropout's N x r bool masks.
    per_layer += sum(value * adapter.rank + 4 * adapter.heads + adapter.heads * adapter.rank for _ in targets) // max(len(layers), 1)
    if training.gradient_checkpointing:
        activations = tokens * (value * hidden * len(layers) + per_layer)
    else:
        activations = tokens * per_layer * len(layers)
    # float32 logits and the cross-entropy's gradient of them; Liger's fused linear
    # cross-entropy (asked for by name) never makes them whole.
    fused = on_cuda and training.base_kernels == "liger"
    logits = 0 if fused else tokens * config.vocab_size * 4 * 2
    return MemoryEstimate(weights=weights, adapter=adapter_bytes, activations=activations, logits=logits)


@dataclass(frozen=True)
class DeviceCapacity:
    """One device of the class a run would train on: its memory and whether it is a GPU."""

    memory_bytes: int
    cuda: bool
    name: str = ""


def memory_problem(model, adapter: AdapterConfig, training: TrainingSettings, device: DeviceCapacity):
    """A `LimitProblem` when the run's estimate is over ``device``'s memory, naming the setting
    that weighs most and what would fit; None when it fits."""
    from .limits import LimitProblem

    estimate = estimate_training_memory(model, adapter, training, on_cuda=device.cuda)
    if estimate.total <= device.memory_bytes:
        return None
    parts = {"weights": estimate.weights, "activations": estimate.activations, "logits": estimate.logits, "adapter": estimate.adapter}
    heaviest = max(parts, key=parts.get)
    field = {"weights": "training.quantization", "activations": "training.batch_size", "logits": "training.batch_size",
             "adapter": "adapter.rank"}[heaviest]
    breakdown = ", ".join(f"{name} {gib(size)}" for name, size in parts.items())
    where = f"{device.name} " if device.name else ""
    return LimitProblem(field, f"the run needs about {gib(estimate.total)} on one device ({breakdown}), over the "
                               f"{gib(device.memory_bytes)} of a {where}device; {heaviest} weigh most. "
                               f"{_what_fits(model, adapter, training, device)}")


# Changes that cut memory without changing what is learnt much, tried in this order.
_SMALLER = (
    {"gradient_checkpointing": True},
    {"quantization": "nf4"},
    {"gradient_checkpointing": True, "quantization": "nf4"},
    {"gradient_checkpointing": True, "quantization": "nf4", "batch_size": 1},
)


def _what_fits(model, adapter: AdapterConfig, training: TrainingSettings, device: DeviceCapacity) -> str:
    for change in _SMALLER:
        change = {k: v for k, v in change.items() if getattr(training, k) != v and not (k == "batch_size" and training.batch_size < v)}
        if not change:
            continue
        smaller = training.model_copy(update=change)
        total = estimate_training_memory(model, adapter, smaller, on_cuda=device.cuda).total
        said = ", ".join(f"training.{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())
        if "batch_size" in change:
            said += f" (gradient_accumulation_steps: {training.batch_size * training.gradient_accumulation_steps} keeps the batch)"
        if total <= device.memory_bytes:
            return f"It would fit with {said}: about {gib(total)}."
    return (f"Nothing fits one such device: even with {said} it needs about {gib(total)}; a device of at least that much "
            "memory is needed.")


def gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"
