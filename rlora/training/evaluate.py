"""Evaluation of an adapter on each task's validation set: answer-token loss and exact match
of greedy generation. `token_loss_sum` is also the training loss, so that both measure the
same thing."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX, Collator, Example, MixtureSource, encode_example, left_pad, prompt_ids
from ..basemodels import eos_token_ids
from .config import TrainingSettings


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled (answer) positions, in float32.

    Only the answer positions are upcast: with a large vocabulary a float32 copy of every
    position's logits would cost more memory than the model's activations."""
    targets = labels[:, 1:].flatten()
    answer = targets != IGNORE_INDEX
    return F.cross_entropy(logits[:, :-1].flatten(0, 1)[answer].float(), targets[answer], reduction="sum")


@torch.no_grad()
def evaluate(
    model, tokenizer, sources: list[MixtureSource], settings: TrainingSettings, device,
    check_stop: Callable[[], None] = lambda: None,
) -> dict[str, dict]:
    """Per task: mean answer-token loss, and exact-match accuracy of greedy generation.

    Runs without autocast, as the inference engine serves the adapter, so that the accuracy
    reported is the one users get. Examples with no answer token within ``max_seq_len`` are
    skipped (``skipped``); ``answers_over_limit`` counts reference answers longer than
    ``eval_max_new_tokens``, which greedy generation cannot match exactly. ``check_stop``
    is called before each batch (it raises to stop).
    """
    collate = Collator(tokenizer.pad_token_id)
    results = {}
    for source in sources:
        examples, features, skipped = _encodable(tokenizer, _validation(source, settings), settings)
        if not examples:
            results[source.task] = {"examples": 0, "skipped": skipped, "loss": None, "accuracy": None}
            continue
        loss_sum, tokens, correct = 0.0, 0, 0
        for chunk, chunk_features in zip(_chunks(examples, settings.batch_size), _chunks(features, settings.batch_size)):
            check_stop()
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


def eval_batches(tokenizer, sources: list[MixtureSource], settings: TrainingSettings, device) -> list[dict]:
    """The evaluated examples of every task as padded batches on ``device`` (what the
    routing summary of a finished run is measured on)."""
    examples = [example for source in sources for example in _validation(source, settings)]
    return _batches(tokenizer, examples, settings, device)


def eval_batches_by_task(tokenizer, sources: list[MixtureSource], settings: TrainingSettings, device) -> dict[str, list[dict]]:
    """`eval_batches` grouped by task: a record's own ``task`` label, else its mixture entry's
    (what the routing-by-task table of a finished run is measured on)."""
    grouped: dict[str, list[Example]] = {}
    for source in sources:
        for example in _validation(source, settings):
            grouped.setdefault(example.task or source.task, []).append(example)
    return {task: _batches(tokenizer, examples, settings, device) for task, examples in grouped.items()}


def _batches(tokenizer, examples: list[Example], settings: TrainingSettings, device) -> list[dict]:
    _, features, _ = _encodable(tokenizer, examples, settings)
    collate = Collator(tokenizer.pad_token_id)
    return [
        {k: v.to(device) for k, v in collate(chunk).items()} for chunk in _chunks(features, settings.batch_size)
    ]


def generate_greedy(model, tokenizer, examples: list[Example], settings: TrainingSettings, device) -> list[str]:
    """Greedy answers for a batch of prompts (left-padded, as decoder-only generation needs)."""
    room = max(settings.max_seq_len - settings.eval_max_new_tokens, 1)
    prompts = [prompt_ids(tokenizer, e, max_len=room) for e in examples]
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    width = input_ids.shape[1]
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=settings.eval_max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos_token_ids(model, tokenizer)),
    )
    return tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)


def _validation(source: MixtureSource, settings: TrainingSettings) -> list[Example]:
    """The validation examples of ``source`` that are evaluated."""
    return (source.validation or [])[: settings.eval_max_examples]


def _encodable(tokenizer, examples: list[Example], settings: TrainingSettings) -> tuple[list[Example], list[dict], int]:
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


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
