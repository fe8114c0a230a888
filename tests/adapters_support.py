"""Adapters for serving tests: trained-looking adapter folders made without training."""

import torch
from transformers import AutoModelForCausalLM

import rlora


def perturbed_adapters(model_dir, configs: dict, root, seed_offset: int = 0) -> dict:
    """An adapter folder per ``id -> AdapterConfig`` under ``root``, every trainable tensor moved
    away from its (identity) start by seeded noise, so that each adapter changes the outputs."""
    paths = {}
    for adapter_id, config in configs.items():
        model = rlora.attach(AutoModelForCausalLM.from_pretrained(model_dir), config)
        generator = torch.Generator().manual_seed(config.seed + seed_offset)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn(param.shape, generator=generator))
        paths[adapter_id] = rlora.save(model, root / adapter_id, base_model_name="tiny")
    return paths
