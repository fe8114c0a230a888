"""The adapter: its config, the `RLoRALinear` layer, attaching it, its folder format and its
diagnostics (head similarity and routing). Names are imported on first use: checking a config
needs no torch."""

from .._exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["adapter_layers", "attach", "trainable_parameters"], ".inject"),
    **dict.fromkeys(["VARIANTS", "AdapterConfig", "AdapterConfigError"], ".config"),
    **dict.fromkeys(
        ["head_similarity", "initial_heads", "record_routing", "routing_by_task", "routing_summary", "update_similarity"],
        ".diagnostics",
    ),
    **dict.fromkeys(["AdapterMismatchError", "base_model_fingerprint", "load", "read_adapter_config", "save"], ".folder"),
    "RLoRALinear": ".layer",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
