"""R-LoRA: randomized multi-head LoRA for multi-task fine-tuning (Liu, Chang and Wu, 2025).

The entry points a script needs; the packages are `rlora.adapter` (the method), `rlora.data`,
`rlora.training` and `rlora.serve` (docs/architecture.md). Names are imported on first use.
"""

from ._exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(
        ["AdapterConfig", "AdapterConfigError", "AdapterMismatchError", "RLoRALinear", "adapter_layers", "attach",
         "head_similarity", "load", "record_routing", "routing_summary", "save", "trainable_parameters"],
        ".adapter",
    ),
    "InferenceEngine": ".serve",
    "TrainConfig": ".training",
    "train": ".training",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
