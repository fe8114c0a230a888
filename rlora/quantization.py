"""A quantized frozen base (QLoRA) through bitsandbytes: NF4 with double quantization, or int8.

Only the base model's linear layers are quantized (bitsandbytes leaves the embeddings and the
output layer as they are); the adapter attaches over them as over any linear layer and stays
float32. bitsandbytes has a CPU backend, so a 4-bit base trains and serves on the CPU too (slowly:
it is there for tests and small models).

An adapter trained over a quantized base is an adapter of the same base model: its fingerprint
(`rlora.adapter.folder.base_model_fingerprint`) is the unquantized model's, the quantized
layers' weights read from the checkpoint files, so it loads over the full-precision base too,
as QLoRA adapters are used. The adapter folder records the quantization it was trained over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Quantization = Literal["none", "nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
_QUANTIZED_WEIGHTS = {"Params4bit": "nf4", "Int8Params": "int8"}


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for ``quantization`` (None for "none"): NF4 with
    double quantization and ``compute_dtype`` as in the QLoRA paper, or LLM.int8()."""
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: {', '.join(QUANTIZATIONS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(f"quantization {quantization!r} needs the bitsandbytes package (pip install bitsandbytes)") from err
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def weight_quantization(linear: nn.Module) -> str:
    """"nf4", "int8" or "none": how ``linear``'s weight is stored."""
    return _QUANTIZED_WEIGHTS.get(type(getattr(linear, "weight", None)).__name__, "none")


def model_quantization(model: nn.Module) -> str:
    """The quantization of ``model``'s linear layers ("none" when none is quantized)."""
    for module in model.modules():
        kind = weight_quantization(module)
        if kind != "none":
            return kind
    return "none"


def linear_shape(linear: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear layer, quantized or not (a 4-bit weight is stored packed)."""
    return (linear.out_features, linear.in_features)


def checkpoint_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """Tensor ``name`` as the model's checkpoint files hold it (before any quantization), read
    alone from its safetensors file."""
    from safetensors import safe_open

    folder = Path(getattr(model.config, "name_or_path", "") or "")
    index = folder / "model.safetensors.index.json"
    file = folder / json.loads(index.read_text())["weight_map"][name] if index.is_file() else folder / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{name}: no safetensors checkpoint in {folder} to read the unquantized weight from")
    with safe_open(str(file), framework="pt") as tensors:
        return tensors.get_tensor(name)
