"""Checkpoints of a training run: what one holds, writing it atomically, and restoring it.

A checkpoint is the folder ``output_dir/checkpoints/step-N``: the adapter's tensors, the
optimizer, scheduler and RNG states, and the loop's counters with the sampler's position
(``state.json``). It is written to a temporary folder and renamed, so a folder named step-N is
complete by construction; restoring the latest one continues the run exactly where it was.
Each checkpoint carries the run's fingerprint, so that a different config pointed at the same
``output_dir`` is refused instead of continued.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapter.config import AdapterConfig
from ..adapter.folder import adapter_state_dict, load_adapter_state_dict
from ..data import MixtureSampler
from .config import TrainConfig

# What a run writes into its output_dir: the adapter folder, metrics.json and checkpoints/.
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
_DIFFERENT_RUN = (
    "{output_dir} holds {what} of a different run (another config); use a new output_dir or remove the old one"
)


@dataclass
class TrainState:
    """Everything a checkpoint holds: the objects that learn and draw data, and the loop's
    counters. Training changes it step by step; `save_checkpoint` and `restore` move all of
    it to and from disk."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: MixtureSampler
    step: int = 0
    train_loss: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    skipped_examples: int = 0
    train_seconds: float = 0.0

    def counters(self) -> dict:
        """The loop's part, as JSON (``state.json`` of a checkpoint)."""
        return {
            "step": self.step,
            "train_loss": self.train_loss,
            "tokens_seen": self.tokens_seen,
            "skipped_examples": self.skipped_examples,
            "train_seconds": self.train_seconds,
            "sampler": self.sampler.state_dict(),
        }


def run_fingerprint(config: TrainConfig) -> str:
    """What must match for a checkpoint or a finished run to belong to this run: everything
    but output_dir, training.compile and training.base_kernels. Compiling and the base model's
    kernels change how the steps run, not what they compute (within float rounding), so a run
    may resume with them switched; and runs
    checkpointed before the setting existed keep their fingerprint. A quantized base changes
    what the steps compute: training.quantization counts, except at "none", so that runs
    checkpointed before it existed keep theirs too."""
    return _digest(_described(config, {}))


def _described(config: TrainConfig, exclude: dict) -> dict:
    unchanged = {"compile", "base_kernels"} | ({"quantization"} if config.training.quantization == "none" else set())
    return config.model_dump(exclude={"output_dir": True, "training": unchanged, **exclude})


def _digest(described: dict) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def different_run_error(output_dir: Path, what: str) -> ValueError:
    return ValueError(_DIFFERENT_RUN.format(output_dir=output_dir, what=what))


def save_checkpoint(output_dir: Path, state: TrainState, run_id: str) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temp folder, then a rename) and keep the
    last ``KEEP_CHECKPOINTS``."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        tensors = {name: t.contiguous().cpu() for name, t in adapter_state_dict(state.model).items()}
        save_file(tensors, staging / "adapter.safetensors")
        torch.save({
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "torch_rng": torch.random.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps({"run": run_id, **state.counters()}))
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted((output_dir / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def resumed_run(config: TrainConfig, output_dir: Path) -> tuple[str, AdapterConfig]:
    """This run's fingerprint and the adapter it attaches. A run that the previous version
    began in ``output_dir`` (a checkpoint or a finished run under the fingerprint it gave this
    config: the same, but with no ``router_init`` in the adapter) is that run, and goes on with
    the layer it began with: ``router_init="zero"`` for random heads (adapter format 1's only
    router), the config's own for zero heads (the same layer then and now). So a job that an
    upgrade interrupted resumes rather than failing on its checkpoint."""
    run_id, adapter_config = run_fingerprint(config), config.adapter_config
    started = _started_run(output_dir)
    if started is None or started == run_id or adapter_config.router_init != "kaiming":
        return run_id, adapter_config
    if started != _digest(_described(config, {"adapter": {"router_init"}})):
        return run_id, adapter_config  # another run: restore refuses it
    return started, replace(adapter_config, router_init="zero") if adapter_config.uses_random_init else adapter_config


def _started_run(output_dir: Path) -> str | None:
    """The fingerprint of the run in ``output_dir``: finished, or its last checkpoint's."""
    if (output_dir / METRICS_FILE).exists() and (output_dir / ADAPTER_DIR).exists():
        return json.loads((output_dir / METRICS_FILE).read_text()).get("run")
    checkpoint = latest_checkpoint(output_dir)
    return None if checkpoint is None else json.loads((checkpoint / "state.json").read_text()).get("run")


def restore(path: Path, state: TrainState, run_id: str) -> None:
    """Load the checkpoint at ``path`` into ``state``; refuses one of another run."""
    saved = json.loads((path / "state.json").read_text())
    if saved.pop("run") != run_id:
        raise different_run_error(path.parent.parent, "checkpoints")
    device = str(next(state.model.parameters()).device)
    load_adapter_state_dict(state.model, load_file(path / "adapter.safetensors", device=device))
    # weights_only: tensors and plain containers only, so a checkpoint written into a shared
    # RLORA_HOME by someone else cannot run code here (pickle could).
    rest = torch.load(path / "optimizer.pt", weights_only=True)
    state.optimizer.load_state_dict(rest["optimizer"])
    state.scheduler.load_state_dict(rest["scheduler"])
    torch.random.set_rng_state(rest["torch_rng"])
    if rest["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rest["cuda_rng"])
    random.setstate(rest["python_rng"])
    state.sampler.load_state_dict(saved.pop("sampler"))
    for name, value in saved.items():  # the counters, as `TrainState.counters` wrote them
        setattr(state, name, value)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new, never a part."""
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(staging, path)
