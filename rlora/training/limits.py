"""Bounds on the work one training run asks for.

The base model's context always bounds ``max_seq_len``: positions past it were never trained
(or do not exist). The other bounds are policy: `TrainingLimits` holds what the caller allows
(the service passes its settings; ``rlora train`` passes none), and `limit_problems` lists
every setting over them with its field path, so that a job is refused before it is queued.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from ..adapter.config import AdapterConfig
from .config import TrainingSettings

if TYPE_CHECKING:
    from .memory import DeviceCapacity


@dataclass(frozen=True)
class TrainingLimits:
    """The most one run may ask for; None: no limit."""

    max_steps: int | None = None
    max_tokens_per_step: int | None = None  # batch_size x gradient_accumulation_steps x max_seq_len
    max_heads_x_rank: int | None = None
    max_adapter_params_per_layer: int | None = None
    max_eval_new_tokens: int | None = None
    max_eval_examples: int | None = None  # validation examples evaluated per task


@dataclass(frozen=True)
class LimitProblem:
    field: str
    message: str


def limit_problems(
    training: TrainingSettings,
    adapter: AdapterConfig,
    base_model: str | os.PathLike,
    train_examples: int,
    limits: TrainingLimits,
    device: "DeviceCapacity | None" = None,
) -> list[LimitProblem]:
    """Every setting of a run on the base model folder ``base_model`` that is over its
    context or over ``limits``, and, given the ``device`` it would train on, a run whose
    memory estimate (`rlora.training.memory`) is over that device's. ``train_examples`` (the
    mixture's training examples) gives the steps of a run measured in epochs."""
    try:
        model = _meta_model(os.fspath(base_model))
    except (OSError, ValueError, KeyError) as err:  # a config transformers cannot read
        return [LimitProblem("base_model", f"the base model's configuration cannot be read: {err}")]
    problems = [problem for problem in (context_problem(training, model.config),) if problem]
    problems += _work_problems(training, train_examples, limits)
    problems += _adapter_problems(adapter, model, limits)
    if device is not None and not any(p.field == "adapter.target_modules" for p in problems):
        from .memory import memory_problem

        problems += [problem for problem in (memory_problem(model, adapter, training, device),) if problem]
    return problems


def context_problem(training: TrainingSettings, model_config) -> LimitProblem | None:
    """``max_seq_len`` over the model's context (its ``max_position_embeddings``), or None."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context is None or training.max_seq_len <= context:
        return None
    return LimitProblem("training.max_seq_len", f"{training.max_seq_len} is over the base model's context of {context} tokens")


def adapter_parameters(adapter: AdapterConfig, d_in: int, d_out: int) -> int:
    """Parameters and frozen buffers an adapter adds to one (d_out, d_in) linear layer (the
    tensors of docs/design.md's adapter folder)."""
    return adapter_trainable_parameters(adapter, d_in, d_out) + adapter_frozen_values(adapter, d_in, d_out)


def adapter_trainable_parameters(adapter: AdapterConfig, d_in: int, d_out: int) -> int:
    """A, the heads B_i and the router of one (d_out, d_in) layer."""
    return adapter.rank * d_in + adapter.heads * d_out * adapter.rank + (adapter.heads * d_in if adapter.has_router else 0)


def adapter_frozen_values(adapter: AdapterConfig, d_in: int, d_out: int) -> int:
    """The frozen correction of random heads: A0 and, routed, the router's and the heads' start
    (router0, B0), else the heads' mean start."""
    if not adapter.uses_random_init:
        return 0
    if adapter.routes_correction:
        return adapter.rank * d_in + adapter.heads * d_in + adapter.heads * d_out * adapter.rank
    return adapter.rank * (d_in + d_out)


def _work_problems(training: TrainingSettings, train_examples: int, limits: TrainingLimits) -> list[LimitProblem]:
    from ..data import epoch_steps

    problems = []
    per_step = training.batch_size * training.gradient_accumulation_steps
    if limits.max_steps is not None:
        if training.max_steps is not None and training.max_steps > limits.max_steps:
            problems.append(LimitProblem("training.max_steps", f"{training.max_steps} is over the limit of {limits.max_steps} steps"))
        elif training.max_steps is None:
            steps = epoch_steps(train_examples, training.epochs, per_step)
            if steps > limits.max_steps:
                problems.append(LimitProblem(
                    "training.epochs",
                    f"{training.epochs:g} epochs of {train_examples} examples, {per_step} a step, are {steps} steps, "
                    f"over the limit of {limits.max_steps} steps",
                ))
    tokens = per_step * training.max_seq_len
    if limits.max_tokens_per_step is not None and tokens > limits.max_tokens_per_step:
        problems.append(LimitProblem(
            "training.batch_size",
            f"batch_size x gradient_accumulation_steps x max_seq_len is {training.batch_size} x "
            f"{training.gradient_accumulation_steps} x {training.max_seq_len} = {tokens} tokens a step, "
            f"over the limit of {limits.max_tokens_per_step}",
        ))
    if limits.max_eval_new_tokens is not None and training.eval_max_new_tokens > limits.max_eval_new_tokens:
        problems.append(LimitProblem(
            "training.eval_max_new_tokens", f"{training.eval_max_new_tokens} is over the limit of {limits.max_eval_new_tokens}"
        ))
    if limits.max_eval_examples is not None and training.eval_max_examples > limits.max_eval_examples:
        problems.append(LimitProblem(
            "training.eval_max_examples", f"{training.eval_max_examples} is over the limit of {limits.max_eval_examples} a task"
        ))
    return problems


def _adapter_problems(adapter: AdapterConfig, model, limits: TrainingLimits) -> list[LimitProblem]:
    from ..adapter.inject import target_linears

    problems = []
    product = adapter.heads * adapter.rank
    if limits.max_heads_x_rank is not None and product > limits.max_heads_x_rank:
        problems.append(LimitProblem(
            "adapter.heads", f"heads x rank is {adapter.heads} x {adapter.rank} = {product}, over the limit of {limits.max_heads_x_rank}"
        ))
    try:
        targets = target_linears(model, adapter)
    except ValueError as err:
        return [*problems, LimitProblem("adapter.target_modules", str(err))]
    if limits.max_adapter_params_per_layer is not None and targets:
        sizes = {path: adapter_parameters(adapter, *_shape(model, path)) for path in targets}
        largest = max(sizes, key=sizes.get)
        if sizes[largest] > limits.max_adapter_params_per_layer:
            problems.append(LimitProblem(
                "adapter.rank",
                f"layer {largest} would get {sizes[largest]} adapter parameters, "
                f"over the limit of {limits.max_adapter_params_per_layer} a layer",
            ))
    return problems


def _shape(model, path: str) -> tuple[int, int]:
    linear = model.get_submodule(path)
    return linear.in_features, linear.out_features


@lru_cache(maxsize=8)
def _meta_model(path: str):
    """The model of the folder ``path`` with its shapes and no weights (on the meta device),
    so that a big base model is checked in milliseconds and no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
