"""The R-LoRA trainer: multi-task fine-tuning of an adapter on a dataset mixture.

`train` is the one function to read: it builds everything from a `TrainConfig`, restores the
last checkpoint in ``output_dir`` if there is one, runs the optimisation loop, evaluates every
task and writes ``adapter/`` and ``metrics.json``. Everything a resumed run needs (step,
adapter, optimizer, scheduler, RNG, data position, loss curve) lives in one checkpoint folder,
written atomically, so running the same config again after an interruption ends with the same
adapter as an uninterrupted run.

The service calls `train` with a progress callback, an event callback and a should-stop
check; ``rlora train CONFIG.yaml`` calls it through `cli_train`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..data import (
    IGNORE_INDEX,
    Collator,
    Example,
    MixtureSampler,
    MixtureSource,
    encode_example,
    load_dataset,
    prompt_ids,
    split_validation,
    steps_for_epochs,
)
from ..adapter import attach, head_similarity, routing_summary, save, trainable_parameters
from ..adapter.folder import adapter_state_dict, load_adapter_state_dict
from ..basemodels import load_base_model, resolve_base_model
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
_DIFFERENT_RUN = (
    "{output_dir} holds {what} of a different run (another config); use a new output_dir or remove the old one"
)
KEEP_CHECKPOINTS = 2
ProgressCallback = Callable[["Progress"], None]
EventCallback = Callable[[str, dict], None]


class TrainingCancelled(Exception):
    """``should_stop`` asked the run to stop; the last checkpoint stays in ``output_dir``."""


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float | None


@dataclass
class TrainState:
    """The loop's own state; with the model, optimizer and scheduler it makes a checkpoint."""

    step: int = 0
    train_loss: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    skipped_examples: int = 0
    train_seconds: float = 0.0
    sampler: dict = field(default_factory=dict)


def train(
    config: TrainConfig,
    *,
    on_progress: ProgressCallback | None = None,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    models_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Train the adapter ``config`` describes and return its metrics (also in metrics.json)."""
    settings = config.training
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda kind, data: None)
    run_id = _run_fingerprint(config)
    if (output_dir / "metrics.json").exists() and (output_dir / "adapter").exists():
        finished = json.loads((output_dir / "metrics.json").read_text())
        if finished.get("run") != run_id:
            raise ValueError(_DIFFERENT_RUN.format(output_dir=output_dir, what="a finished run"))
        return finished

    # 1. Model, tokenizer and adapter.
    device = _device(settings.device)
    bf16 = settings.precision == "bfloat16" or (
        settings.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    base_path = resolve_base_model(
        config.base_model,
        models_dir if models_dir is not None else os.environ.get("RLORA_MODELS_DIR"),
        cache_dir if cache_dir is not None else default_cache_dir(),
    )
    model, tokenizer = load_base_model(base_path, dtype=torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32)
    attach(model, config.adapter_config)
    model.to(device)
    if settings.gradient_checkpointing:
        # Non-reentrant, so the frozen embeddings need not require grad for adapters to train.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    collate = Collator(tokenizer.pad_token_id)

    # 2. Data: the mixture, each task's validation set, and the run's length.
    sources = load_mixture(config)
    total_steps = settings.max_steps or steps_for_epochs(
        sources, settings.epochs, settings.batch_size * settings.gradient_accumulation_steps
    )
    sampler = MixtureSampler(sources, seed=settings.seed)

    # 3. Optimizer and schedule: AdamW, linear warmup, cosine decay to zero.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = math.ceil(settings.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total_steps))

    # 4. Resume from the last checkpoint, or start from the seed.
    state = TrainState()
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        state = _restore(checkpoint, run_id, model, optimizer, scheduler, sampler)
        emit("resumed", {"step": state.step})
    else:
        _seed_everything(settings.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 5. The loop: one optimizer step per iteration, gradient accumulation inside.
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    while state.step < total_steps:
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"stopped at step {state.step} of {total_steps}")
        step_start = time.perf_counter()
        micro_batches = [
            _next_batch(sampler, tokenizer, settings.batch_size, settings.max_seq_len, state, collate)
            for _ in range(settings.gradient_accumulation_steps)
        ]
        # Every answer token of the step weighs the same, whatever micro-batch it is in.
        label_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = token_loss_sum(logits, batch["labels"]) / label_tokens
            loss.backward()
            step_loss += loss.item()
            window_tokens += int(batch["attention_mask"].sum())
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state.step += 1
        state.tokens_seen += window_tokens
        state.train_seconds += time.perf_counter() - step_start
        state.train_loss.append({"step": state.step, "loss": round(step_loss, 6)})
        if state.step % settings.checkpoint_every == 0 or state.step == total_steps:
            path = save_checkpoint(output_dir, state, sampler, model, optimizer, scheduler, run_id)
            emit("checkpoint", {"step": state.step, "path": str(path)})
        if on_progress is not None:
            elapsed = time.perf_counter() - window_start
            seconds_per_step = state.train_seconds / max(state.step, 1)
            on_progress(Progress(
                step=state.step,
                total_steps=total_steps,
                loss=step_loss,
                learning_rate=learning_rate,
                tokens_per_second=window_tokens / elapsed if elapsed > 0 else 0.0,
                eta_seconds=seconds_per_step * (total_steps - state.step),
            ))
        window_start, window_tokens = time.perf_counter(), 0

    # 6. Evaluate every task, describe the heads, write the adapter and the metrics.
    model.eval()
    evaluation = evaluate(model, tokenizer, sources, settings, device)
    emit("eval", {"step": state.step, "tasks": evaluation})
    _, eval_features, _ = _encodable(tokenizer, _eval_examples(sources, settings), settings)
    eval_batches = [collate(chunk) for chunk in _chunks(eval_features, settings.batch_size)]
    metrics = {
        "run": run_id,
        "base_model": config.base_model,
        "steps": state.step,
        "train_loss": state.train_loss,
        "eval": evaluation,
        "head_similarity": head_similarity(model),
        "routing": routing_summary(model, [{k: v.to(device) for k, v in b.items()} for b in eval_batches])
        if config.adapter_config.has_router else None,
        "tokens_per_second": state.tokens_seen / state.train_seconds if state.train_seconds else 0.0,
        "train_seconds": state.train_seconds,
        "trainable_parameters": trainable_parameters(model),
        "skipped_examples": state.skipped_examples,
        "peak_memory_bytes": _peak_memory(device),
    }
    save(model, output_dir / "adapter", base_model_name=config.base_model)
    _write_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_mixture(config: TrainConfig) -> list[MixtureSource]:
    """Read every dataset of the mixture and hold out each task's validation set."""
    sources = []
    for index, entry in enumerate(config.mixture):
        examples = load_dataset(entry.path)
        if entry.validation_path:
            validation = load_dataset(entry.validation_path)
        else:
            # A seed per task, so tasks with equal sizes do not hold out the same positions.
            examples, validation = split_validation(
                examples, config.training.validation_share, _task_seed(config.training.seed, entry.task)
            )
        sources.append(MixtureSource(examples=examples, weight=entry.weight, task=entry.task, validation=validation))
    return sources


def _next_batch(sampler, tokenizer, batch_size, max_seq_len, state, collate) -> dict[str, torch.Tensor]:
    """``batch_size`` encoded examples; those with no answer token left after truncation are
    skipped (and counted), but a mixture where nothing fits is an error, not a hang."""
    features, attempts = [], 0
    while len(features) < batch_size:
        _, example = sampler.next_batch(1)[0]
        attempts += 1
        try:
            features.append(encode_example(tokenizer, example, max_seq_len))
        except ValueError:
            state.skipped_examples += 1
            if attempts > 100 * batch_size and not features:
                raise ValueError(f"no example has answer tokens within max_seq_len={max_seq_len}") from None
    return collate(features)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled (answer) positions, in float32.

    Only the answer positions are upcast: with a large vocabulary a float32 copy of every
    position's logits would cost more memory than the model's activations."""
    targets = labels[:, 1:].flatten()
    answer = targets != IGNORE_INDEX
    return F.cross_entropy(logits[:, :-1].flatten(0, 1)[answer].float(), targets[answer], reduction="sum")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer, sources: list[MixtureSource], settings, device) -> dict[str, dict]:
    """Per task: mean answer-token loss, and exact-match accuracy of greedy generation.

    Runs without autocast, as the inference engine serves the adapter, so that the accuracy
    reported is the one users get. Examples with no answer token within ``max_seq_len`` are
    skipped (``skipped``); ``answers_over_limit`` counts reference answers longer than
    ``eval_max_new_tokens``, which greedy generation cannot match exactly.
    """
    collate = Collator(tokenizer.pad_token_id)
    results = {}
    for source in sources:
        examples, features, skipped = _encodable(tokenizer, (source.validation or [])[: settings.eval_max_examples], settings)
        if not examples:
            results[source.task] = {"examples": 0, "skipped": skipped, "loss": None, "accuracy": None}
            continue
        loss_sum, tokens, correct = 0.0, 0, 0
        for chunk, chunk_features in zip(_chunks(examples, settings.batch_size), _chunks(features, settings.batch_size)):
            batch = {k: v.to(device) for k, v in collate(chunk_features).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum += float(token_loss_sum(logits, batch["labels"]))
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            answers = generate_greedy(model, tokenizer, chunk, settings, device)
            correct += sum(answer.strip() == example.answer.strip() for answer, example in zip(answers, chunk))
        results[source.task] = {
            "examples": len(examples),
            "skipped": skipped,
            "loss": loss_sum / max(tokens, 1),
            "accuracy": correct / len(examples),
            "answers_over_limit": sum(
                sum(label != IGNORE_INDEX for label in f["labels"]) > settings.eval_max_new_tokens for f in features
            ),
        }
    return results


def _encodable(tokenizer, examples: list[Example], settings) -> tuple[list[Example], list[dict], int]:
    """The examples that keep an answer token within ``max_seq_len``, their encodings, and how
    many were left out."""
    kept, features = [], []
    for example in examples:
        try:
            features.append(encode_example(tokenizer, example, settings.max_seq_len))
        except ValueError:
            continue
        kept.append(example)
    return kept, features, len(examples) - len(kept)


def generate_greedy(model, tokenizer, examples: list[Example], settings, device) -> list[str]:
    """Greedy answers for a batch of prompts (left-padded, as decoder-only generation needs)."""
    room = max(settings.max_seq_len - settings.eval_max_new_tokens, 1)
    prompts = [prompt_ids(tokenizer, e, max_len=room) for e in examples]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    generated = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=settings.eval_max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_stop_ids(model, tokenizer),
    )
    return tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)


def _stop_ids(model, tokenizer) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def _eval_examples(sources: list[MixtureSource], settings) -> list[Example]:
    return [e for s in sources for e in (s.validation or [])[: settings.eval_max_examples]]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(output_dir: Path, state: TrainState, sampler, model, optimizer, scheduler, run_id: str) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temp folder, then a rename) and keep the
    last ``KEEP_CHECKPOINTS``. A folder named step-N is complete by construction."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        state.sampler = sampler.state_dict()
        save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}, staging / "adapter.safetensors")
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.random.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps({"run": run_id, **asdict(state)}))
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


def _restore(path: Path, run_id: str, model, optimizer, scheduler, sampler) -> TrainState:
    saved = json.loads((path / "state.json").read_text())
    if saved.pop("run") != run_id:
        raise ValueError(_DIFFERENT_RUN.format(output_dir=path.parent.parent, what="checkpoints"))
    state = TrainState(**saved)
    load_adapter_state_dict(model, load_file(path / "adapter.safetensors", device=str(next(model.parameters()).device)))
    rest = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    torch.random.set_rng_state(rest["torch_rng"])
    if rest["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rest["cuda_rng"])
    random.setstate(rest["python_rng"])
    sampler.load_state_dict(state.sampler)
    return state


def _run_fingerprint(config: TrainConfig) -> str:
    """What must match for a checkpoint to belong to this run: everything but output_dir."""
    described = config.model_dump(exclude={"output_dir"})
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where built-in models are built: ``$RLORA_HOME/models`` (``~/.rlora/models``)."""
    return Path(os.environ.get("RLORA_HOME", Path.home() / ".rlora")).expanduser() / "models"


def _device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _task_seed(seed: int, task: str) -> int:
    return int(hashlib.sha256(f"{seed}:{task}".encode()).hexdigest()[:8], 16)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the whole process's peak, the honest number on a CPU.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _write_atomically(path: Path, text: str) -> None:
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(staging, path)


# --------------------------------------------------------------------------------------------
# rlora train CONFIG.yaml
# --------------------------------------------------------------------------------------------


def read_train_config(path: str | os.PathLike) -> TrainConfig:
    """A `TrainConfig` from YAML; relative paths in it are relative to the YAML file's folder.

    Raises ValueError with one line per problem, each naming its field.
    """
    import yaml
    from pydantic import ValidationError

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
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
        lines = [f"{_field_path(e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ValueError(f"{path} has {len(lines)} problem(s):\n  " + "\n  ".join(lines)) from None


def cli_train(config_path: str) -> int:
    """``rlora train CONFIG.yaml``: exit 0 when trained, 2 for a bad config, 1 for a failure."""
    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # ours is the one progress bar
    try:
        config = read_train_config(config_path)
        for entry in config.mixture:
            for file in filter(None, (entry.path, entry.validation_path)):
                if not Path(file).is_file():
                    raise ValueError(f"mixture task {entry.task!r}: no such file {file}")
    except ValueError as err:
        print(f"rlora train: {err}", file=sys.stderr)
        return 2
    bar = tqdm(total=None, unit="step", dynamic_ncols=True, file=sys.stderr)

    def progress(p: Progress) -> None:
        bar.total = p.total_steps
        bar.n = p.step
        bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.learning_rate:.2e}", tok_s=f"{p.tokens_per_second:.0f}", refresh=False)
        bar.refresh()

    def event(kind: str, data: dict) -> None:
        if kind == "resumed":
            bar.write(f"resuming from the checkpoint at step {data['step']}", file=sys.stderr)

    try:
        metrics = train(config, on_progress=progress, on_event=event)
    except KeyboardInterrupt:
        bar.close()
        print("rlora train: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command's contract: a message and exit 1
        bar.close()
        print(f"rlora train: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    bar.close()
    print(json.dumps({"output_dir": config.output_dir, "steps": metrics["steps"], "eval": metrics["eval"],
                      "head_similarity": metrics["head_similarity"]["mean"]}, indent=2))
    return 0


def _field_path(location: tuple) -> str:
    parts = []
    for item in location:
        parts.append(f"[{item}]" if isinstance(item, int) else (f".{item}" if parts else str(item)))
    return "".join(parts)
