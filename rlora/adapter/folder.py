"""The adapter folder: ``save``, ``load``, its tensor names and the base model's fingerprint.

The adapter folder is a documented format (docs/design.md section 3): ``adapter_config.json`` holds
the `AdapterConfig`, the base model's name and fingerprint and the library version;
``adapter_model.safetensors`` holds, for each adapted module path ``P``, ``P.lora_A``,
``P.lora_B``, ``P.router`` (not for lora), and only when the heads start non-zero ``P.lora_A0``,
``P.lora_B0`` and (for a Kaiming router) ``P.router0``.

Format version 2 added ``router_init`` and the routed correction (``P.router0``, and
``P.lora_B0`` as every initial head (N, d_out, r)). Version 1 had no choice: random heads had a
zero router and ``P.lora_B0`` was their mean (d_out, r); such a folder loads as
``router_init="zero"``, which is that very layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..quantization import checkpoint_tensor, linear_shape, model_quantization, weight_quantization
from .inject import adapter_layers, attach, config_of, device_of
from .config import AdapterConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 2
ADAPTER_TENSORS = ("lora_A", "lora_B", "router", "lora_A0", "router0", "lora_B0")


class AdapterMismatchError(ValueError):
    """The adapter does not fit the model it is loaded into."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their documented names, e.g. ``P.lora_B`` (N, d_out, r)."""
    tensors = {}
    for path, layer in adapter_layers(model).items():
        for key in ADAPTER_TENSORS:
            tensor = getattr(layer, key)
            if tensor is not None:
                tensors[f"{path}.{key}"] = tensor.detach()
    return tensors


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy documented tensors into the attached adapter; names and shapes must match exactly."""
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter tensors do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, target in expected.items():
            if tensors[name].shape != target.shape:
                raise AdapterMismatchError(f"{name}: shape {tuple(tensors[name].shape)} in the adapter, {tuple(target.shape)} in the model")
            target.copy_(tensors[name])


def save(model: nn.Module, path: str | os.PathLike, *, base_model_name: str | None = None) -> Path:
    """Write the adapter folder atomically: a reader sees the old folder or the new one, never half."""
    config: AdapterConfig = config_of(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "rlora-adapter",
        "format_version": FORMAT_VERSION,
        **config.to_dict(),
        "base_model_name": base_model_name or base_model_name_of(model),
        "base_model_fingerprint": base_model_fingerprint(model),
        "base_model_quantization": model_quantization(model),
        "rlora_version": _version(),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Any]]:
    """The `AdapterConfig` of an adapter folder, and the folder's other metadata."""
    meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    if meta.get("format") != "rlora-adapter":
        raise AdapterMismatchError(f"{path} is not an rlora adapter folder (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterMismatchError(f"{path} has format version {meta['format_version']}; this library reads up to {FORMAT_VERSION}")
    fields = AdapterConfig.__dataclass_fields__
    settings = {k: v for k, v in meta.items() if k in fields}
    if meta.get("format_version", 0) < 2 and "router_init" not in settings:
        # Version 1 started the router of random heads at zero, of zero heads Kaiming-uniform.
        random_heads = settings.get("method", "rlora") == "rlora" and settings.get("random_init") is not False
        settings["router_init"] = "zero" if random_heads else "kaiming"
    config = AdapterConfig.from_dict(settings)
    return config, {k: v for k, v in meta.items() if k not in fields}


def load(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> nn.Module:
    """Attach the adapter saved at ``path`` to a fresh base model, in place, and return it.

    Refuses an adapter made for another base model (by config fingerprint) unless
    ``check_base`` is false.
    """
    config, meta = read_adapter_config(path)
    if check_base:
        check_base_model(meta, base_model_fingerprint(model), adapter=str(path), base_model=base_model_name_of(model))
    attach(model, config)
    load_adapter_state_dict(model, load_file(Path(path) / WEIGHTS_FILE, device=str(device_of(model))))
    return model


def check_base_model(meta: dict[str, Any], fingerprint: str, *, adapter: str, base_model: str) -> None:
    """Raise `AdapterMismatchError` unless the adapter folder's metadata ``meta`` names the base
    model whose fingerprint is ``fingerprint``."""
    if meta.get("base_model_fingerprint") != fingerprint:
        raise AdapterMismatchError(
            f"adapter {adapter!r} was made for base model {meta.get('base_model_name')!r} "
            f"(fingerprint {str(meta.get('base_model_fingerprint'))[:12]}), not for {base_model!r} "
            f"(fingerprint {fingerprint[:12]})"
        )


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def base_model_fingerprint(model: nn.Module) -> str:
    """sha256 of what makes a base model this one: its architecture and a sample of its weights.

    The architecture is ``model_type`` and the shape of every base parameter, not the whole HF
    config, whose runtime flags and key names vary with settings and library versions. The
    weight sample (the first values of the input embeddings and of the first and last linear
    layers, rounded to bfloat16 so a float32 and a bfloat16 load agree) tells apart two
    checkpoints of one architecture, such as a base model and its chat fine-tune.
    """
    # A quantized layer's weight is stored packed: its shape is the layer's (d_out, d_in).
    logical = {f"{name}.weight": list(linear_shape(m)) for name, m in model.named_modules() if weight_quantization(m) != "none"}
    shapes = {
        name: logical.get(name, list(p.shape)) for name, p in model.named_parameters()
        if not any(name.endswith(f".{t}") for t in ADAPTER_TENSORS)
    }
    # Wrapped layers hold their base weights one level down; the fingerprint is of the base.
    shapes = {name.replace(".base_layer.", "."): shape for name, shape in shapes.items()}
    hf_config = getattr(model, "config", None)
    described = {"model_type": getattr(hf_config, "model_type", type(model).__name__), "shapes": shapes}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for weight in _sampled_weights(model):
        digest.update(weight.detach().flatten()[:256].to("cpu", torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()


def _sampled_weights(model: nn.Module) -> list[torch.Tensor]:
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    sampled = [embeddings.weight] if isinstance(embeddings, nn.Embedding) else []
    for name, linear in linears[:1] + linears[-1:]:
        if weight_quantization(linear) == "none":
            sampled.append(linear.weight)
        else:  # the unquantized values, so that the fingerprint is the base model's in any form
            sampled.append(checkpoint_tensor(model, f"{name.replace('.base_layer', '')}.weight"))
    return sampled


def base_model_name_of(model: nn.Module) -> str:
    hf_config = getattr(model, "config", None)
    name = getattr(hf_config, "name_or_path", "") if hf_config is not None else ""
    return Path(name).name if name else type(model).__name__


def _replace_dir(staging: Path, path: Path) -> None:
    """Move ``staging`` to ``path``, replacing an existing folder with two renames. A reader
    never sees a half-written folder; a crash between the renames leaves the previous adapter
    as ``.NAME.old-PID`` beside the missing ``path``, to be restored by hand."""
    if path.exists():
        retired = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, retired)
        os.rename(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, path)


def _version() -> str:
    from .. import __version__

    return __version__
