"""Attaching adapters to a model (`attach`): wrapping its target linear layers in `RLoRALinear`."""

from __future__ import annotations

import torch
from torch import nn

from .config import ALL_LINEAR, AdapterConfig
from .layer import RLoRALinear


def attach(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the model's target `nn.Linear` layers in `RLoRALinear`, in place, and return it.

    Every base parameter is frozen; only adapter parameters are trainable. Initialisation draws
    from a generator seeded by ``config.seed``, so the global RNG is left as it was.
    """
    if adapter_layers(model):
        raise ValueError("model already has adapters attached; load it fresh to attach another")
    targets = target_linears(model, config)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    for path in targets:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, RLoRALinear(getattr(parent, child), config, generator))
    model.rlora_config = config
    return model


def adapter_layers(model: nn.Module) -> dict[str, RLoRALinear]:
    """Adapted module path -> layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RLoRALinear)}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def target_linears(model: nn.Module, config: AdapterConfig) -> list[str]:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if config.target_modules == ALL_LINEAR:
        # As PEFT's "all-linear": every linear layer but the output projection.
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [name for name, m in linears.items() if m is not output]
    wanted = set(config.target_modules)
    found = [name for name in linears if is_target(config, name)]
    matched = {name.rpartition(".")[2] for name in found} | {name for name in found}
    unknown = sorted(wanted - matched)
    if unknown:
        available = sorted({name.rpartition(".")[2] for name in linears})
        raise ValueError(
            f"target_modules {unknown} match no linear layer of this model; "
            f"its linear layers are: {', '.join(available) or 'none'} (or use {ALL_LINEAR!r})"
        )
    return found


def config_of(model: nn.Module) -> AdapterConfig:
    config = getattr(model, "rlora_config", None)
    if config is None:
        raise ValueError("model has no adapter attached (call rlora.attach first)")
    return config


def device_of(model: nn.Module) -> torch.device:
    return next(iter(adapter_layers(model).values())).lora_A.device


def is_target(config: AdapterConfig, module_path: str) -> bool:
    """Whether ``config.target_modules`` names the linear layer at ``module_path``: by its
    last name (``down_proj``) or its whole path; "all-linear" names every one."""
    if config.target_modules == ALL_LINEAR:
        return True
    return module_path in config.target_modules or module_path.rpartition(".")[2] in config.target_modules
