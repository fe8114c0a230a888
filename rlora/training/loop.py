"""The R-LoRA trainer: multi-task fine-tuning of an adapter on a dataset mixture.

`train` is the one function to read: it builds everything from a `TrainConfig`, restores the
last checkpoint in ``output_dir`` if there is one, runs the optimisation loop, evaluates every
task and writes ``adapter/`` and ``metrics.json``. Everything a resumed run needs lives in one
`TrainState`, checkpointed atomically (`checkpoint`), so running the same config again after an
interruption ends with the same adapter as an uninterrupted run.

The library reads no environment: where base models are found (``models_dir``) and where the
built-in ``tiny`` model is built (``cache_dir``) are arguments. The service's worker calls
`train` with a progress callback, an event callback and a should-stop check; the ``rlora
train CONFIG.yaml`` command (service/cli.py) calls it with a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import get_cosine_schedule_with_warmup

from ..adapter import (
    attach,
    head_similarity,
    initial_heads,
    routing_by_task,
    routing_summary,
    save,
    trainable_parameters,
    update_similarity,
)
from ..basemodels import load_base_model, resolve_base_model
from ..data import (
    IGNORE_INDEX,
    Collator,
    MixtureSampler,
    MixtureSource,
    encode_example,
    load_dataset,
    split_validation,
    steps_for_epochs,
)
from ..data.mixture import TaskNotInRecords, entry_tasks, label_of
from .checkpoint import (
    ADAPTER_DIR,
    METRICS_FILE,
    TrainState,
    different_run_error,
    latest_checkpoint,
    restore,
    resumed_run,
    save_checkpoint,
    write_atomically,
)
from .base_kernels import answer_loss_sum, apply_base_kernels
from .config import TrainConfig, TrainingSettings
from .evaluate import eval_batches, eval_batches_by_task, evaluate
from .limits import context_problem

ProgressCallback = Callable[["Progress"], None]
EventCallback = Callable[[str, dict], None]

# torch.compile's backend for training.compile; the CPU tests swap in "aot_eager", which traces
# the same graphs without inductor's minutes of C++ compilation.
_COMPILE_BACKEND = "inductor"


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


def train(
    config: TrainConfig,
    *,
    on_progress: ProgressCallback | None = None,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    models_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Train the adapter ``config`` describes and return its metrics (also in metrics.json).

    ``models_dir`` holds base models by folder name; ``cache_dir`` is where the built-in
    ``tiny`` model is built on first use (a ValueError when ``config.base_model`` is ``tiny``
    and none is given).
    """
    settings = config.training
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda kind, data: None)
    run_id, adapter_config = resumed_run(config, output_dir)
    if (output_dir / METRICS_FILE).exists() and (output_dir / ADAPTER_DIR).exists():
        finished = json.loads((output_dir / METRICS_FILE).read_text())
        if finished.get("run") != run_id:
            raise different_run_error(output_dir, "a finished run")
        return finished

    # 1. Model, tokenizer and adapter. What the run is doing is announced as a "phase" event
    # as each part begins: "preparing" (model and data), "training" (the loop), "evaluating"
    # (the final evaluation), "saving" (the adapter and metrics).
    emit("phase", {"phase": "preparing"})
    device = _device(settings.device)
    bf16 = settings.precision == "bfloat16" or (
        settings.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    base_path = resolve_base_model(config.base_model, models_dir, cache_dir)
    dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    quantized = settings.quantization != "none"
    # A quantized base is loaded onto its device (it cannot be moved); the adapter's tensors
    # are made beside each layer's weight.
    model, tokenizer = load_base_model(base_path, dtype=dtype, device=device if quantized else None,
                                       quantization=settings.quantization)
    too_long = context_problem(settings, model.config)
    if too_long is not None:
        raise ValueError(f"{too_long.field}: {too_long.message}")
    attach(model, adapter_config)
    start_heads = initial_heads(model)  # B(0), before a resumed run restores trained heads
    if not quantized:
        model.to(device)
    if settings.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    base_kernels = apply_base_kernels(model, settings.base_kernels, device)
    compiled = _compile_decoder_layers(model, settings.compile, device)
    collate = Collator(tokenizer.pad_token_id, width=settings.max_seq_len if compiled else None)

    # 2. Data: the mixture, each task's validation set, and the run's length.
    sources = load_mixture(config)
    total_steps = settings.max_steps or steps_for_epochs(
        sources, settings.epochs, settings.batch_size * settings.gradient_accumulation_steps
    )

    # 3. Optimizer and schedule: AdamW, linear warmup, cosine decay to zero.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    state = TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=_cosine_schedule(optimizer, math.ceil(settings.warmup_ratio * total_steps), total_steps),
        sampler=MixtureSampler(sources, seed=settings.seed),
    )

    # 4. Resume from the last checkpoint, or start from the seed.
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        restore(checkpoint, state, run_id)
        emit("resumed", {"step": state.step})
    else:
        # Not transformers.set_seed: it also seeds numpy, which refuses the seeds over 2**32 - 1
        # that TrainingSettings accepts, and nothing here draws from numpy.
        random.seed(settings.seed)
        torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def check_stop(phase: str = "") -> None:
        # Consulted in every phase that takes time, so a stop asked during the final
        # evaluation ends the run too, instead of it finishing as if never asked.
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"stopped at step {state.step} of {total_steps}{phase}")

    # 5. The loop: one optimizer step per iteration, gradient accumulation inside. A stop is
    # honoured between examples encoded and between micro-batches, not only between steps:
    # a big step is minutes of work. The step it interrupts is redone from the checkpoint.
    emit("phase", {"phase": "training", "step": state.step})
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    while state.step < total_steps:
        step_start = time.perf_counter()
        micro_batches = [
            _next_batch(state, tokenizer, settings, collate, check_stop) for _ in range(settings.gradient_accumulation_steps)
        ]
        # Every answer token of the step weighs the same, whatever micro-batch it is in.
        label_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            check_stop()
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = answer_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], base_kernels)
            loss = loss / label_tokens
            loss.backward()
            step_loss += loss.item()
            window_tokens += int(batch["attention_mask"].sum())
        # The adapter's gradient norm (before clipping) is recorded with the loss: whether the
        # router and heads still learn late in a run shows in it.
        if settings.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        learning_rate = state.scheduler.get_last_lr()[0]
        optimizer.step()
        state.scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state.step += 1
        state.tokens_seen += window_tokens
        state.train_seconds += time.perf_counter() - step_start
        state.train_loss.append({"step": state.step, "loss": round(step_loss, 6), "grad_norm": round(float(grad_norm), 6)})
        if state.step % settings.checkpoint_every == 0 or state.step == total_steps:
            path = save_checkpoint(output_dir, state, run_id)
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

    # 6. Evaluate every task, describe the heads, write the adapter and the metrics. Compiled
    # layers run eagerly here: generation changes shape every token and the routing observer
    # is a Python hook in the layer, recompilations for a pass that runs once.
    emit("phase", {"phase": "evaluating", "step": state.step})
    model.eval()
    with torch.compiler.set_stance("force_eager"):
        evaluation = evaluate(model, tokenizer, sources, settings, device, check_stop=lambda: check_stop(" while evaluating"))
        emit("eval", {"step": state.step, "tasks": evaluation})
        check_stop(" after evaluating")
        routing = None
        if config.adapter_config.has_router:
            routing = routing_summary(model, eval_batches(tokenizer, sources, settings, device))
            by_task = eval_batches_by_task(tokenizer, sources, settings, device)
            # For a mixture with task labels: does routing separate the tasks?
            routing["by_task"] = routing_by_task(model, by_task) if len(by_task) > 1 else None
    metrics = {
        "run": run_id,
        "base_model": config.base_model,
        "steps": state.step,
        "train_loss": state.train_loss,
        "eval": evaluation,
        "head_similarity": {**head_similarity(model), "learned_update": update_similarity(model, start_heads)},
        "routing": routing,
        "tokens_per_second": state.tokens_seen / state.train_seconds if state.train_seconds else 0.0,
        "trained_tokens": state.tokens_seen,
        "train_seconds": state.train_seconds,
        "trainable_parameters": trainable_parameters(model),
        "skipped_examples": state.skipped_examples,
        "peak_memory_bytes": _peak_memory(device),
        "compiled": compiled,
        "base_kernels": "liger" if base_kernels else "none",
        "quantization": settings.quantization,
    }
    check_stop(" before saving")
    emit("phase", {"phase": "saving", "step": state.step})
    save(model, output_dir / ADAPTER_DIR, base_model_name=config.base_model)
    write_atomically(output_dir / METRICS_FILE, json.dumps(metrics, indent=2))
    return metrics


def load_mixture(config: TrainConfig) -> list[MixtureSource]:
    """Read every dataset of the mixture, one source per task (an entry may take its tasks
    from its records' labels: `entry_tasks`), and hold out each task's validation set.

    An entry's weight is its share of the draws, split across its tasks by their record
    counts. A ValueError names the entry (``mixture[i].task``) whose task no record carries,
    or whose records' task is another entry's too."""
    sources: list[MixtureSource] = []
    owner: dict[str, int] = {}
    for index, entry in enumerate(config.mixture):
        examples = load_dataset(entry.path)
        validation_file = load_dataset(entry.validation_path) if entry.validation_path else None
        try:
            tasks = entry_tasks(Counter(label_of(e) for e in examples), entry.task)
        except TaskNotInRecords as err:
            raise ValueError(f"mixture[{index}].task: {err}") from None
        groups = {task: [e for e in examples if label_of(e) == label] for task, label in tasks.items()}
        total = sum(len(group) for group in groups.values())
        for task, label in tasks.items():
            if task in owner:
                raise ValueError(f"mixture[{index}].task: task {task!r} is also the task of mixture[{owner[task]}]")
            owner[task] = index
            train = groups[task]
            if validation_file is not None:
                labelled = any(example.task for example in validation_file)
                validation = [e for e in validation_file if label_of(e) == label] if labelled else validation_file
            else:
                # A seed per task, so tasks with equal sizes do not hold out the same positions.
                train, validation = split_validation(
                    train, config.training.validation_share, _task_seed(config.training.seed, task)
                )
            weight = entry.weight * len(groups[task]) / total
            sources.append(MixtureSource(examples=train, weight=weight, task=task, validation=validation))
    return sources


def _next_batch(
    state: TrainState, tokenizer, settings: TrainingSettings, collate: Collator, check_stop: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """``batch_size`` encoded examples; those with no answer token left after truncation are
    skipped (and counted), but a mixture where nothing fits is an error, not a hang.
    ``check_stop`` is called before each example is encoded."""
    features, attempts = [], 0
    while len(features) < settings.batch_size:
        check_stop()
        _, example = next(state.sampler)
        attempts += 1
        try:
            features.append(encode_example(tokenizer, example, settings.max_seq_len))
        except ValueError:
            state.skipped_examples += 1
            if attempts > 100 * settings.batch_size and not features:
                raise ValueError(f"no example has answer tokens within max_seq_len={settings.max_seq_len}") from None
    return collate(features)


def _cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total_steps: int):
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total_steps``.

    transformers' schedule is counted from step 1 here (one more warmup and total step, and
    created as if one step had passed): counted from 0 its warmup would give the first step a
    learning rate of 0, a wasted step. So step s (from 0) trains at ``(s + 1) / (warmup + 1)``
    of the learning rate during warmup.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # what a scheduler created past step 0 starts from
    return get_cosine_schedule_with_warmup(optimizer, warmup + 1, total_steps + 1, last_epoch=0)


def _compile_decoder_layers(model, setting: str, device: torch.device) -> bool:
    """Compile each decoder layer in place when ``setting`` asks for it ("auto": on CUDA);
    returns whether it did.

    Regional compilation: the layers are alike, so dynamo compiles two graphs whatever the
    depth (the first layer, whose input needs no gradient, and the rest), seconds where a
    whole-model graph takes minutes. ``nn.Module.compile`` keeps the module tree as it is, so
    parameter names (checkpoints, the saved adapter) carry no ``_orig_mod.``. Shapes are
    static (``dynamic=False``): the trainer pads every batch to ``max_seq_len``.
    """
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return False
    # A fresh cache per run: a worker trains job after job in one process, and past dynamo's
    # recompile limit per function a new model or shape would quietly run eager.
    torch.compiler.reset()
    # On by default on CUDA: a layer the compiler cannot handle (a model or a torch version not
    # tried) runs eager, with dynamo's warning in the log, rather than failing the job.
    torch._dynamo.config.suppress_errors = True
    for layer in model.get_decoder().layers:
        layer.compile(backend=_COMPILE_BACKEND, dynamic=False)
    return True


def _enable_gradient_checkpointing(model) -> None:
    # Non-reentrant, so the frozen embeddings need not require grad for adapters to train.
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _task_seed(seed: int, task: str) -> int:
    return int(hashlib.sha256(f"{seed}:{task}".encode()).hexdigest()[:8], 16)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the whole process's peak, the honest number on a CPU.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
