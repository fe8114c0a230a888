"""The adapter: its config, the `RLoRALinear` layer, attaching it, its folder format and its
diagnostics (head similarity and routing)."""

from .attach import adapter_layers, attach, trainable_parameters
from .config import VARIANTS, AdapterConfig, AdapterConfigError
from .diagnostics import head_similarity, record_routing, routing_summary
from .folder import AdapterMismatchError, base_model_fingerprint, load, read_adapter_config, save
from .layer import RLoRALinear

__all__ = [
    "VARIANTS",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterMismatchError",
    "RLoRALinear",
    "adapter_layers",
    "attach",
    "base_model_fingerprint",
    "head_similarity",
    "load",
    "read_adapter_config",
    "record_routing",
    "routing_summary",
    "save",
    "trainable_parameters",
]
