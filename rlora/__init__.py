"""R-LoRA: randomized multi-head LoRA for multi-task fine-tuning (Liu, Chang and Wu, 2025)."""

__version__ = "0.1.0"

from .config import AdapterConfig, AdapterConfigError
from .diagnostics import head_similarity, record_routing, routing_summary
from .layer import RLoRALinear
from .model import AdapterMismatchError, adapter_layers, attach, load, save, trainable_parameters

__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterMismatchError",
    "RLoRALinear",
    "adapter_layers",
    "attach",
    "head_similarity",
    "load",
    "record_routing",
    "routing_summary",
    "save",
    "trainable_parameters",
]
