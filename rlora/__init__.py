"""R-LoRA: randomized multi-head LoRA for multi-task fine-tuning (Liu, Chang and Wu, 2025).

The entry points a script needs; the packages are `rlora.adapter` (the method), `rlora.data`,
`rlora.train` and `rlora.serve` (docs/architecture.md).
"""

__version__ = "0.1.0"

from .adapter import (
    AdapterConfig,
    AdapterConfigError,
    AdapterMismatchError,
    RLoRALinear,
    adapter_layers,
    attach,
    head_similarity,
    load,
    record_routing,
    routing_summary,
    save,
    trainable_parameters,
)
from .serve import InferenceEngine
from .train import TrainConfig, train

__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterMismatchError",
    "InferenceEngine",
    "RLoRALinear",
    "TrainConfig",
    "adapter_layers",
    "attach",
    "head_similarity",
    "load",
    "record_routing",
    "routing_summary",
    "save",
    "train",
    "trainable_parameters",
]
