"""What a training run is: base model, dataset mixture, adapter and training settings.

These pydantic models are the one definition of a job's fields. ``rlora train CONFIG.yaml``
reads them from YAML with `read_train_config` (mixture entries with a local ``path``); the
service validates the body of ``POST /v1/jobs`` with the same ``TrainingSettings`` and maps its
``file_id`` entries to paths before it calls the trainer. `field_path` names a field in the
errors of either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..adapter.config import AdapterConfig, AdapterConfigError
from ..data.mixture import FROM_RECORDS


class TrainingSettings(BaseModel):
    """Optimisation settings. Defaults follow the paper's Appendix C where it gives them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="optimizer steps; wins over epochs")
    epochs: float | None = Field(None, gt=0, le=1000, description="passes over the mixture's training examples")
    batch_size: int = Field(8, ge=1, le=4096, description="examples per forward pass, drawn from the mixture by weight")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=4096, description="forward passes summed into one optimizer step (effective batch: batch_size x this)"
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="AdamW's peak learning rate, reached after warmup")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps with a linear warmup; a cosine decay to 0 follows")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW's decoupled weight decay of the adapter parameters")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradients clipped to this global norm; null: no clipping")
    max_seq_len: int = Field(
        512, ge=8, le=131_072, description="tokens of one example; longer ones lose their oldest context, then the answer's end"
    )
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    validation_share: float = Field(0.1, ge=0, lt=1, description="share of each task held out when no validation set is given")
    eval_max_examples: int = Field(64, ge=0, le=100_000, description="validation examples evaluated per task")
    eval_max_new_tokens: int = Field(32, ge=1, le=4096, description="tokens generated per validation example for exact match")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, more time")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 autocast on CUDA, float32 on CPU; adapter weights stay float32"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where to train; in the service it also picks the queue (cpu or gpu workers)"
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="compile the decoder layers with torch.compile; auto: on CUDA only"
    )
    base_kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="the frozen model's RMSNorm, SwiGLU, RoPE and loss through Liger-kernel; auto: on CUDA where "
        "liger-kernel is installed and supports the model"
    )
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="the frozen base's linear layers through bitsandbytes: nf4 (QLoRA: 4-bit NormalFloat, double "
        "quantization, computing in the run's precision) or int8 (LLM.int8()); the adapter stays float32"
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seeds sampling, dropout and the validation split: same seed, same run")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        # YAML reads an unquoted on/off (and true/false) as a boolean: take those as the words.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @model_validator(mode="after")
    def _default_length(self) -> "TrainingSettings":
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class MixtureEntry(BaseModel):
    """One dataset of a mixture, read from a local file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(min_length=1, description="a JSONL file or JSON array of records")
    weight: float = Field(1.0, gt=0, description="relative sampling weight")
    task: str = Field(
        min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$",
        description=f"the task of this dataset's records: a name, or {FROM_RECORDS!r} for each record's own task label "
        "(records without one: 'default'); a name the file's labelled records do not carry is an error",
    )
    validation_path: str | None = Field(None, description="held-out set; otherwise validation_share of path")


class TrainConfig(BaseModel):
    """A whole run: what ``rlora train`` reads and what the worker hands to the trainer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: str = Field(min_length=1, description="'tiny', a folder under the models directory (the service's RLORA_MODELS_DIR), or a path")
    mixture: list[MixtureEntry] = Field(min_length=1, max_length=64)
    adapter: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    output_dir: str = Field(min_length=1)

    @field_validator("adapter")
    @classmethod
    def _valid_adapter(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            return AdapterConfig.from_dict(value).to_dict()
        except AdapterConfigError as err:
            # pydantic reports this under "adapter"; the message names the inner field.
            raise ValueError(str(err)) from None

    @field_validator("mixture")
    @classmethod
    def _unique_tasks(cls, value: list[MixtureEntry]) -> list[MixtureEntry]:
        seen: set[str] = set()
        for entry in value:
            if entry.task == FROM_RECORDS:
                continue  # its tasks are its records' labels, checked as the files are read
            if entry.task in seen:
                raise ValueError(f"task {entry.task!r} appears twice; give each dataset its own task name")
            seen.add(entry.task)
        return value

    @field_validator("mixture")
    @classmethod
    def _one_entry_per_file(cls, value: list[MixtureEntry]) -> list[MixtureEntry]:
        # The same file twice is the same data at a higher weight, read, held and encoded once
        # more each time (the entries' indexes name it, never its path: the service's paths
        # are its own business).
        first: dict[str, int] = {}
        for index, entry in enumerate(value):
            earlier = first.setdefault(os.path.realpath(entry.path), index)
            if earlier != index:
                raise ValueError(f"mixture[{index}] reads the same file as mixture[{earlier}]; give each file once and set its weight")
        return value

    @property
    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig.from_dict(self.adapter)



def read_yaml_settings(path: Path) -> dict[str, Any]:
    """The mapping of settings a YAML file holds; ValueError naming the file otherwise."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no such file {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return data


def read_train_config(path: str | os.PathLike) -> TrainConfig:
    """A `TrainConfig` from YAML; relative paths in it are relative to the YAML file's folder.

    Raises ValueError with one line per problem, each naming its field.
    """
    path = Path(path)
    data = read_yaml_settings(path)
    folder = path.resolve().parent
    for entry in data.get("mixture") or []:
        if isinstance(entry, dict):
            for key in ("path", "validation_path"):
                if isinstance(entry.get(key), str):
                    entry[key] = str(folder / entry[key])
    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = str(folder / data["output_dir"])
    try:
        return TrainConfig(**data)
    except ValidationError as err:
        lines = [f"{field_path(e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ValueError(f"{path} has {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None


def field_path(location: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic error location as a field name: ``("mixture", 0, "path")`` -> ``mixture[0].path``."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path
