"""The task mixture: its sources (`MixtureSource`), each one's held-out validation set
(`split_validation`), a run's length in epochs (`steps_for_epochs`), and `MixtureSampler`, a
seeded, resumable stream of ``(task, Example)`` following the weights."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from .records import DEFAULT_TASK, Example

# A mixture entry's task that takes each record's task from its label.
FROM_RECORDS = "from_records"


class TaskNotInRecords(ValueError):
    """A mixture entry names a task that none of its file's labelled records carries."""

    def __init__(self, task: str, labels: Sequence[str]):
        shown = ", ".join(repr(label) for label in sorted(labels)[:20])
        super().__init__(f"no record carries task {task!r}; the file's task labels are {shown} (or use {FROM_RECORDS!r})")
        self.task = task
        self.labels = list(labels)


def entry_tasks(label_counts: Mapping[str, int], task: str) -> dict[str, str]:
    """The tasks a mixture entry trains, each mapped to the label of its records
    (``DEFAULT_TASK`` for records without one), from the file's records per label.

    ``FROM_RECORDS``: one task per label. A file with no labelled record: all its records
    are ``task``. Otherwise ``task`` must be one of the labels, and only its records are
    used; else `TaskNotInRecords`."""
    if task == FROM_RECORDS:
        return {label: label for label in label_counts}
    labelled = [label for label in label_counts if label != DEFAULT_TASK]
    if not labelled:
        return {task: DEFAULT_TASK}
    if task in label_counts:
        return {task: task}
    raise TaskNotInRecords(task, labelled)


def label_of(example: Example) -> str:
    return example.task or DEFAULT_TASK


@dataclass
class MixtureSource:
    """One task of a mixture.

    ``task`` names every example drawn from this source: the mixture entry's task, or with
    ``FROM_RECORDS`` the records' label (`entry_tasks`); task names are unique across the
    mixture. ``validation`` is the held-out set (given, or made with ``split_validation``).
    """

    examples: list[Example]
    weight: float
    task: str
    validation: list[Example] | None = None


def split_validation(examples: Sequence[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``share`` of the examples, chosen by ``seed``; both parts keep the file order.

    At least one example is held out when ``share > 0`` and there are two or more, and at
    least one always stays for training.
    """
    count = len(examples)
    chosen = set(random.Random(f"{seed}:validation").sample(range(count), held_out_count(count, share)))
    train = [example for index, example in enumerate(examples) if index not in chosen]
    validation = [example for index, example in enumerate(examples) if index in chosen]
    return train, validation


def steps_for_epochs(sources: Sequence[MixtureSource], epochs: float, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over the mixture's training examples:
    ``ceil(epochs * total / batch_size)``, ``batch_size`` being the examples per optimizer step
    (batch times gradient accumulation). Sampling follows the weights, so a heavy source is
    seen more than ``epochs`` times and a light one less; the total is what ``epochs`` fixes."""
    return epoch_steps(sum(len(source.examples) for source in sources), epochs, batch_size)


def held_out_count(count: int, share: float) -> int:
    """How many of ``count`` examples `split_validation` holds out for ``share``."""
    if not 0 <= share < 1:
        raise ValueError(f"validation share must be in [0, 1), got {share}")
    return 0 if share == 0 or count < 2 else min(count - 1, max(1, round(share * count)))


def epoch_steps(examples: int, epochs: float, batch_size: int) -> int:
    """`steps_for_epochs` for a count of training examples, before any is read."""
    if epochs <= 0 or batch_size < 1:
        raise ValueError(f"need epochs > 0 and batch_size >= 1, got {epochs} and {batch_size}")
    # Rounding first keeps 0.1 * 30 / 3 from becoming 2 steps after float error (1.0000000002).
    return max(1, math.ceil(round(epochs * examples / batch_size, 9)))


class MixtureSampler:
    """An infinite, seeded, resumable stream of ``(task, Example)`` following the weights.

    Each draw picks a source with probability proportional to its weight, then takes that
    source's next example in a shuffled order that is reshuffled at each of its epochs, so a
    source's examples are all seen once before any is seen twice.

    All randomness is derived from ``seed`` and counters (the draw number; the source and its
    epoch), never from a running generator. The state is therefore just those counters: small,
    JSON-serialisable, and restoring it continues the stream exactly.
    """

    def __init__(self, sources: Sequence[MixtureSource], seed: int):
        _check_sources(sources)
        self.sources = list(sources)
        self.seed = int(seed)
        self._cumulative = list(itertools.accumulate(source.weight for source in self.sources))
        self._drawn = 0
        self._epochs = [0] * len(self.sources)
        self._cursors = [0] * len(self.sources)
        self._orders: dict[int, tuple[int, list[int]]] = {}  # source -> (epoch, its order)

    def __iter__(self) -> Iterator[tuple[str, Example]]:
        return self

    def __next__(self) -> tuple[str, Example]:
        index = self._pick_source()
        source = self.sources[index]
        example = source.examples[self._order(index)[self._cursors[index]]]
        self._cursors[index] += 1
        if self._cursors[index] == len(source.examples):
            self._epochs[index] += 1
            self._cursors[index] = 0
        self._drawn += 1
        return source.task, example

    def next_batch(self, batch_size: int) -> list[tuple[str, Example]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [next(self) for _ in range(batch_size)]

    @property
    def drawn(self) -> int:
        """Examples drawn so far."""
        return self._drawn

    @property
    def epochs(self) -> dict[str, float]:
        """Passes made over each source, by task (fractional within the current pass)."""
        return {
            source.task: epoch + cursor / len(source.examples)
            for source, epoch, cursor in zip(self.sources, self._epochs, self._cursors)
        }

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "drawn": self._drawn,
            "sources": [
                {"task": source.task, "size": len(source.examples), "epoch": epoch, "cursor": cursor}
                for source, epoch, cursor in zip(self.sources, self._epochs, self._cursors)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses one saved for another seed or other sources, where
        continuing would silently give a different stream."""
        expected = [(source.task, len(source.examples)) for source in self.sources]
        saved = [(entry["task"], entry["size"]) for entry in state["sources"]]
        if state["seed"] != self.seed or saved != expected:
            raise ValueError(
                f"sampler state is for seed {state['seed']} and sources {saved}, "
                f"not seed {self.seed} and sources {expected}"
            )
        self._drawn = int(state["drawn"])
        self._epochs = [int(entry["epoch"]) for entry in state["sources"]]
        self._cursors = [int(entry["cursor"]) for entry in state["sources"]]
        self._orders.clear()

    def _pick_source(self) -> int:
        point = random.Random(f"{self.seed}:pick:{self._drawn}").random() * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, point), len(self.sources) - 1)

    def _order(self, index: int) -> list[int]:
        epoch = self._epochs[index]
        cached = self._orders.get(index)
        if cached is None or cached[0] != epoch:
            order = list(range(len(self.sources[index].examples)))
            random.Random(f"{self.seed}:order:{index}:{epoch}").shuffle(order)
            cached = self._orders[index] = (epoch, order)
        return cached[1]


def _check_sources(sources: Sequence[MixtureSource]) -> None:
    if not sources:
        raise ValueError("a mixture needs at least one source")
    for index, source in enumerate(sources):
        name = f"mixture source {index} (task {source.task!r})"
        if not (math.isfinite(source.weight) and source.weight > 0):
            raise ValueError(f"{name}: weight must be > 0, got {source.weight}")
        if not source.examples:
            raise ValueError(f"{name}: no training examples")
