"""Base models by name: the built-in ``tiny`` and Hugging Face folders under a models directory.

Nothing here downloads: a name is either ``tiny`` (built on first use into ``cache_dir``), a
folder name under ``models_dir``, or a path to such a folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .tiny import TINY_MODEL_NAME, build_tiny_model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class UnknownBaseModel(LookupError):
    def __init__(self, name: str, available: list[str]):
        super().__init__(f"unknown base model {name!r}; available: {', '.join(available) or 'none'}")
        self.name = name
        self.available = available


def list_base_models(models_dir: str | os.PathLike | None) -> list[str]:
    """``tiny`` and every folder under ``models_dir`` that holds a model ``config.json``."""
    names = [TINY_MODEL_NAME]
    if models_dir and Path(models_dir).is_dir():
        names += sorted(
            entry.name
            for entry in Path(models_dir).iterdir()
            if entry.is_dir() and _NAME.match(entry.name) and (entry / "config.json").is_file()
            and entry.name != TINY_MODEL_NAME
        )
    return names


def resolve_base_model(
    name: str, models_dir: str | os.PathLike | None, cache_dir: str | os.PathLike | None
) -> Path:
    """The folder of base model ``name``; builds ``tiny`` into ``cache_dir`` on first use, so
    ``cache_dir`` is needed for ``tiny`` (and only for it)."""
    if name == TINY_MODEL_NAME:
        if cache_dir is None:
            raise ValueError(f"base model {TINY_MODEL_NAME!r} is built on first use: give cache_dir, where to build it")
        return build_tiny_model(Path(cache_dir) / TINY_MODEL_NAME)
    if _NAME.match(name) and models_dir and (Path(models_dir) / name / "config.json").is_file():
        return Path(models_dir) / name
    if os.sep in name and (Path(name) / "config.json").is_file():
        return Path(name)
    raise UnknownBaseModel(name, list_base_models(models_dir))


def load_base_model(path: str | os.PathLike, *, dtype=None, device=None, quantization: str = "none"):
    """Model and tokenizer from a local folder, offline; its linear layers quantized to
    ``quantization`` (`rlora.quantization`: "nf4" or "int8", computing in ``dtype``), which
    loads them straight onto ``device``: a quantized model cannot be moved afterwards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .quantization import bnb_config

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    quantization_config = bnb_config(quantization, dtype or torch.float32)
    if quantization_config is None:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        if device is not None:
            model.to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, quantization_config=quantization_config,
            device_map={"": str(device or "cpu")},
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every token that ends a generation: the tokenizer's eos and the model's generation
    config's (chat models often add an end-of-turn token there)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return frozenset(i for i in [*ids, tokenizer.eos_token_id] if isinstance(i, int))
