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


def rewrite_as_format_v1(path):
    """Turn a saved ``router_init="zero"`` R-LoRA adapter folder into the folder format version 1
    wrote: the same tensors (a zero router, ``lora_B0`` the mean initial head (d_out, r), no
    ``router0``), a config without ``router_init`` and ``format_version`` 1."""
    import json

    from safetensors.torch import load_file

    config_file = path / "adapter_config.json"
    meta = json.loads(config_file.read_text())
    assert meta.pop("router_init") == "zero", "version 1 had only the zero router for random heads"
    meta["format_version"] = 1
    config_file.write_text(json.dumps(meta, indent=2) + "\n")
    tensors = load_file(path / "adapter_model.safetensors")
    assert not any(name.endswith(".router0") for name in tensors)
    assert all(t.dim() == 2 for name, t in tensors.items() if name.endswith(".lora_B0"))
    return path
