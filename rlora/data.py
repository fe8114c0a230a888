"""The dataset layer of the trainer: reading and validating files, the task mixture, tokenization.

Three parts, each usable on its own:

* ``validate_dataset`` / ``load_dataset`` read JSONL or a JSON array of records in the three
  shapes of DESIGN.md section 3 and normalise every record to an ``Example``. The validator
  collects every problem it finds (with line or element number and field) instead of stopping
  at the first, because the service shows the list to the user who uploaded the file.
* ``MixtureSampler`` draws a seeded, resumable stream of ``(task, Example)`` following the
  mixture weights.
* ``encode_example`` / ``prompt_ids`` / ``Collator`` turn examples into token ids with loss on
  the answer tokens only.

Nothing here knows about HTTP, Celery or the database.
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Sequence

import torch

SHAPES = ("prompt_completion", "alpaca", "chat")
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_TASK = "default"  # summary key for records without a task
IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy (and HF models) skip

_SHOWN_ERRORS = 20
_JSON_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_PEEK_BYTES = 1 << 16
# Fields that identify a record's shape; a record must use exactly one shape.
_SHAPE_MARKERS = {
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
}


# --------------------------------------------------------------------------------------------
# 1. Reading and validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordError:
    """One problem in a dataset file.

    ``line`` is the 1-based line (for JSONL the record's line; for a JSON array the line where
    the element starts), ``element`` the 0-based array index (JSON arrays only), ``field`` the
    offending field (``messages[2].role`` for nested ones), or None where they do not apply.
    """

    line: int | None
    element: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.element is not None:
            suffix = f" (line {self.line})" if self.line is not None else ""
            where.append(f"element {self.element}{suffix}")
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DatasetValidationError(ValueError):
    """A dataset file has problems.

    ``errors`` holds the problems found (at most ``max_errors`` of ``validate_dataset``),
    ``total`` counts all of them, so a user sees how much is wrong even past the cap.
    """

    def __init__(self, errors: list[RecordError], total: int | None = None):
        self.errors = list(errors)
        self.total = len(self.errors) if total is None else total
        shown = "".join(f"\n  {error}" for error in self.errors[:_SHOWN_ERRORS])
        hidden = self.total - min(len(self.errors), _SHOWN_ERRORS)
        more = f"\n  ... and {hidden} more" if hidden else ""
        plural = "" if self.total == 1 else "s"
        super().__init__(f"invalid dataset: {self.total} problem{plural}{shown}{more}")

    def __reduce__(self):
        # Rebuild from the fields, not from the message: Celery pickles exceptions.
        return (self.__class__, (self.errors, self.total))


@dataclass(frozen=True)
class Example:
    """A record normalised to what training and evaluation need.

    ``prompt`` is the text the model is given and ``answer`` the text it must produce. For an
    Alpaca record ``prompt`` is ``instruction + "\\n\\n" + input`` (just the instruction when
    ``input`` is empty). For a chat record ``messages`` holds the whole conversation (only
    ``role`` and ``content`` kept) and is what gets tokenized; ``answer`` is its final
    assistant turn and ``prompt`` the message just before it, for display and exact-match eval.
    """

    prompt: str
    answer: str
    task: str | None
    messages: tuple[dict, ...] | None = None


@dataclass(frozen=True)
class DatasetSummary:
    """What a valid file holds: ``format`` ("jsonl" or "json"), the record count, records per
    task (records without a task under ``DEFAULT_TASK``) and records per shape."""

    format: str
    records: int
    tasks: dict[str, int]
    shapes: dict[str, int]


class _Collector:
    """Keeps the first ``limit`` errors and counts all of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.errors: list[RecordError] = []
        self.total = 0

    def add(self, line: int | None, element: int | None, field: str | None, message: str) -> None:
        self.total += 1
        if len(self.errors) < self.limit:
            self.errors.append(RecordError(line, element, field, message))


def validate_dataset(
    data: bytes | str | os.PathLike,
    *,
    max_record_chars: int = 100_000,
    max_errors: int = 100,
) -> tuple[list[Example], DatasetSummary]:
    """Read and check a dataset; return its examples and a summary, or raise with every problem.

    ``data`` is the file's content as ``bytes``, or a path (``str`` or ``os.PathLike``; a
    ``str`` is always a path, never content). JSONL is read line by line, so a large file is
    never held whole; a JSON array (the first non-whitespace byte is ``[``) has to be read
    whole. A UTF-8 byte-order mark is tolerated.

    Raises ``DatasetValidationError`` listing up to ``max_errors`` problems (all of them are
    counted): bad JSON, a record that is not an object, an unknown or ambiguous shape, missing
    or mistyped fields, an empty answer, a bad chat role, a conversation not ending with the
    assistant, non-UTF-8 bytes, a record longer than ``max_record_chars``, and an empty file.
    """
    if isinstance(data, (bytes, bytearray)):
        stream: BinaryIO = io.BytesIO(bytes(data))
    else:
        stream = open(os.fspath(data), "rb")
    with stream:
        return _validate_stream(stream, max_record_chars, _Collector(max_errors))


def load_dataset(path: str | os.PathLike) -> list[Example]:
    """The examples of a valid dataset file (``validate_dataset`` without the summary)."""
    return validate_dataset(path)[0]


def _validate_stream(
    stream: BinaryIO, max_record_chars: int, errors: _Collector
) -> tuple[list[Example], DatasetSummary]:
    if stream.read(len(_BOM)) != _BOM:
        stream.seek(0)
    fmt = _detect_format(stream)
    records: list[tuple[Example, str]] = []
    if fmt == "json":
        _read_array(stream, max_record_chars, errors, records)
    elif fmt == "jsonl":
        _read_lines(stream, max_record_chars, errors, records)
    if not records and not errors.total:
        errors.add(None, None, None, "empty file: no records")
    if errors.total:
        raise DatasetValidationError(errors.errors, errors.total)
    summary = DatasetSummary(
        format=fmt,
        records=len(records),
        tasks=dict(Counter(example.task or DEFAULT_TASK for example, _ in records)),
        shapes=dict(Counter(shape for _, shape in records)),
    )
    return [example for example, _ in records], summary


def _detect_format(stream: BinaryIO) -> str | None:
    """The format by the first non-whitespace byte (``[``: "json", else "jsonl"), or None
    when the stream holds only whitespace. Leaves the stream where it was."""
    start = stream.tell()
    try:
        while chunk := stream.read(_PEEK_BYTES):
            content = chunk.lstrip(_JSON_WHITESPACE)
            if content:
                return "json" if content.startswith(b"[") else "jsonl"
        return None
    finally:
        stream.seek(start)


def _read_lines(
    stream: BinaryIO, max_chars: int, errors: _Collector, records: list[tuple[Example, str]]
) -> None:
    for number, raw in enumerate(stream, start=1):
        if not raw.strip(_JSON_WHITESPACE):
            continue
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            errors.add(number, None, None, f"not valid UTF-8 (byte {err.start + 1} of the line)")
            continue
        if len(text) > max_chars:
            errors.add(number, None, None, _too_long(len(text), max_chars))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            errors.add(number, None, None, f"invalid JSON: {err.msg} (column {err.colno})")
            continue
        except (RecursionError, ValueError) as err:
            errors.add(number, None, None, _json_error(err))
            continue
        _accept(value, number, None, errors, records)


def _read_array(
    stream: BinaryIO, max_chars: int, errors: _Collector, records: list[tuple[Example, str]]
) -> None:
    """Parse the array element by element, so each element's line is known and a syntax
    error names the element it is in."""
    raw = stream.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        for number, line in enumerate(raw.split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                errors.add(number, None, None, f"not valid UTF-8 (byte {err.start + 1} of the line)")
        return
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, text.index("[") + 1)
    line, line_position = 1, 0
    if text.startswith("]", position):
        position += 1
    else:
        for element in itertools.count():
            line += text.count("\n", line_position, position)
            line_position = position
            try:
                value, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as err:
                errors.add(err.lineno, element, None, f"invalid JSON: {err.msg} (column {err.colno})")
                return
            except (RecursionError, ValueError) as err:
                errors.add(line, element, None, _json_error(err))
                return
            if end - position > max_chars:
                errors.add(line, element, None, _too_long(end - position, max_chars))
            else:
                _accept(value, line, element, errors, records)
            position = _skip_whitespace(text, end)
            if text.startswith(",", position):
                position = _skip_whitespace(text, position + 1)
            elif text.startswith("]", position):
                position += 1
                break
            else:
                found = "end of file" if position >= len(text) else repr(text[position])
                message = f"invalid JSON: expected ',' or ']' after the element, found {found}"
                errors.add(_line_at(text, position), element, None, message)
                return
    position = _skip_whitespace(text, position)
    if position < len(text):
        errors.add(_line_at(text, position), None, None, "invalid JSON: unexpected data after the array")


def _too_long(chars: int, limit: int) -> str:
    return f"record is {chars} characters, over the limit of {limit}"


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _line_at(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _accept(
    value: Any, line: int | None, element: int | None, errors: _Collector, records: list[tuple[Example, str]]
) -> None:
    """Normalise one parsed record, or report its problems. Examples stop being kept once the
    file is known to be invalid: they would be thrown away."""
    problems: list[tuple[str | None, str]] = []
    parsed = _normalize(value, problems)
    for field, message in problems:
        errors.add(line, element, field, message)
    if parsed is not None and not errors.total:
        records.append(parsed)


def _normalize(record: Any, problems: list[tuple[str | None, str]]) -> tuple[Example, str] | None:
    """The record as an ``Example`` and its shape name, or None with ``problems`` filled in."""
    if not isinstance(record, dict):
        problems.append((None, f"record must be a JSON object, got {_json_type(record)}"))
        return None
    shapes = [shape for shape, keys in _SHAPE_MARKERS.items() if any(key in record for key in keys)]
    if not shapes:
        problems.append((None, "unknown record shape: expected 'prompt' and 'completion', "
                               "'instruction' and 'output', or 'messages'"))
        return None
    if len(shapes) > 1:
        problems.append((None, f"record mixes the fields of several shapes ({', '.join(shapes)}); use one"))
        return None
    shape = shapes[0]
    task = _task(record, problems)
    if shape == "prompt_completion":
        prompt = _string(record, "prompt", problems, non_empty=False)
        answer = _string(record, "completion", problems)
        example = None if problems else Example(prompt=prompt, answer=answer, task=task)
    elif shape == "alpaca":
        example = _alpaca(record, task, problems)
    else:
        example = _chat(record, task, problems)
    return None if example is None else (example, shape)


def _alpaca(record: dict, task: str | None, problems: list) -> Example | None:
    instruction = _string(record, "instruction", problems)
    extra = _string(record, "input", problems, non_empty=False, required=False) or ""
    answer = _string(record, "output", problems)
    if problems:
        return None
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(prompt=prompt, answer=answer, task=task)


def _chat(record: dict, task: str | None, problems: list) -> Example | None:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        kind = "an empty array" if isinstance(messages, list) else _json_type(messages)
        problems.append(("messages", f"must be a non-empty array of messages, got {kind}"))
        return None
    normalized = []
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append((name, f"must be an object with 'role' and 'content', got {_json_type(message)}"))
            continue
        role = message.get("role")
        if role not in CHAT_ROLES:
            got = "missing" if "role" not in message else f"got {role!r}"
            problems.append((f"{name}.role", f"must be one of {', '.join(CHAT_ROLES)} ({got})"))
            continue
        content = _string(message, "content", problems, non_empty=role == "assistant", prefix=f"{name}.")
        normalized.append({"role": role, "content": content})
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") in CHAT_ROLES and last["role"] != "assistant":
        problems.append(("messages", "the last message must be the assistant's (it is the answer)"))
    if problems:
        return None
    prompt = normalized[-2]["content"] if len(normalized) > 1 else ""
    return Example(prompt=prompt, answer=normalized[-1]["content"], task=task, messages=tuple(normalized))


def _task(record: dict, problems: list) -> str | None:
    """The record's ``task`` (``task_type`` is accepted as an alias, as Alpaca-style sets use)."""
    name = "task" if "task" in record else "task_type"
    if record.get(name) is None:
        return None
    return _string(record, name, problems)


def _string(
    record: dict, name: str, problems: list, *, non_empty: bool = True, required: bool = True, prefix: str = ""
) -> str | None:
    """``record[name]`` when it is a string (non-blank if ``non_empty``), else a problem.
    An optional field may be absent or null."""
    if name not in record or (not required and record[name] is None):
        if required:
            problems.append((prefix + name, "missing"))
        return None
    value = record[name]
    if not isinstance(value, str):
        problems.append((prefix + name, f"must be a string, got {_json_type(value)}"))
        return None
    if non_empty and not value.strip():
        problems.append((prefix + name, "must be a non-empty string"))
        return None
    surrogate = _lone_surrogate(value)
    if surrogate is not None:
        problems.append((prefix + name, f"contains an unpaired surrogate \\u{ord(value[surrogate]):04x} (character {surrogate + 1}): not valid Unicode text"))
        return None
    return value


def _lone_surrogate(text: str) -> int | None:
    """Where ``text`` has a lone UTF-16 surrogate (JSON's ``"\\ud800"`` parses to one), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _json_error(err: Exception) -> str:
    """What a JSON parser's non-syntax failure means for the record."""
    if isinstance(err, RecursionError):
        return "invalid JSON: nested too deeply"
    if "digits" in str(err):
        return "invalid JSON: a number has too many digits"
    return f"invalid JSON: {err}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# --------------------------------------------------------------------------------------------
# 2. Mixture
# --------------------------------------------------------------------------------------------


@dataclass
class MixtureSource:
    """One dataset of a mixture.

    ``task`` names every example drawn from this source: a record's own ``task`` field is
    ignored for sampling, because the mixture entry is what the user configured for this run
    (and task names must be unique across the mixture, while a file's labels need not be).
    ``validation`` is the held-out set (given, or made with ``split_validation``).
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
    if not 0 <= share < 1:
        raise ValueError(f"validation share must be in [0, 1), got {share}")
    count = len(examples)
    held_out = 0 if share == 0 or count < 2 else min(count - 1, max(1, round(share * count)))
    chosen = set(random.Random(f"{seed}:validation").sample(range(count), held_out))
    train = [example for index, example in enumerate(examples) if index not in chosen]
    validation = [example for index, example in enumerate(examples) if index in chosen]
    return train, validation


def steps_for_epochs(sources: Sequence[MixtureSource], epochs: float, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over the mixture's training examples:
    ``ceil(epochs * total / batch_size)``, ``batch_size`` being the examples per optimizer step
    (batch times gradient accumulation). Sampling follows the weights, so a heavy source is
    seen more than ``epochs`` times and a light one less; the total is what ``epochs`` fixes."""
    if epochs <= 0 or batch_size < 1:
        raise ValueError(f"need epochs > 0 and batch_size >= 1, got {epochs} and {batch_size}")
    total = sum(len(source.examples) for source in sources)
    # Rounding first keeps 0.1 * 30 / 3 from becoming 2 steps after float error (1.0000000002).
    return max(1, math.ceil(round(epochs * total / batch_size, 9)))


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


# --------------------------------------------------------------------------------------------
# 3. Tokenization
# --------------------------------------------------------------------------------------------
#
# Every example is tokenized as a conversation: prompt/completion and Alpaca records become
# [user: prompt, assistant: answer]. With a chat template the tokenizer's template renders it;
# without one the documented default renders each user/system turn as f"{content}\n" and each
# assistant turn as its content followed by the eos token, so prompt/completion reads
# f"{prompt}\n{answer}<eos>". The bos token, when the tokenizer has one, is put first unless
# the rendered text already starts with it (templates such as Llama's include it; the tiny
# model's does not). The labelled tokens of an assistant turn are found by tokenizing the
# conversation up to that turn (with the generation prompt) and through it, and taking the
# common prefix with the whole conversation's tokens, which holds even when the tokenizer
# merges across the boundary.


def encode_example(tokenizer: Any, example: Example, max_seq_len: int) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one example; labels are ``IGNORE_INDEX`` except on the
    assistant turns' tokens and their end token (eos, or the template's end of turn).

    Over ``max_seq_len`` tokens, the context before the final answer is dropped from the left
    (after the bos token), then if the answer alone is still too long its end is cut. Raises
    ValueError when no labelled token is left, which the trainer counts as a skipped example.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    messages = _conversation(example)
    unprefixed = _token_ids(tokenizer, _render(tokenizer, messages, add_generation_prompt=False))
    input_ids = with_bos(tokenizer, unprefixed)
    offset = len(input_ids) - len(unprefixed)
    labels = [IGNORE_INDEX] * len(input_ids)
    answer_start = len(input_ids)
    for start, end in _assistant_spans(tokenizer, messages, unprefixed):
        labels[offset + start : offset + end] = input_ids[offset + start : offset + end]
        answer_start = offset + start
    input_ids, labels = _truncate(input_ids, labels, answer_start, _bos_count(tokenizer, input_ids), max_seq_len)
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"example has no answer tokens within max_seq_len={max_seq_len}")
    return {"input_ids": input_ids, "labels": labels}


def prompt_ids(tokenizer: Any, example: Example, max_len: int | None = None) -> list[int]:
    """The ids a model is given to generate ``example.answer``: everything before the final
    assistant turn, with the generation prompt; the same tokens ``encode_example`` puts before
    the answer. Over ``max_len``, the oldest tokens after bos are dropped."""
    context = _conversation(example)[:-1]
    ids = with_bos(tokenizer, _token_ids(tokenizer, _render(tokenizer, context, add_generation_prompt=True)))
    if max_len is not None and len(ids) > max_len:
        head = _bos_count(tokenizer, ids)
        ids = ids[:head] + ids[len(ids) - max(max_len - head, 0) :]
    return ids


def with_bos(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """``ids`` with the tokenizer's bos token first, unless it is there already or there is
    none. Exposed so that generation from raw text follows the same convention."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):
        return list(ids)
    return [bos, *ids]


def _bos_count(tokenizer: Any, ids: Sequence[int]) -> int:
    """1 when ``ids`` starts with bos: truncation keeps it, as the model always saw it first."""
    return int(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)


class Collator:
    """Pads a batch of ``encode_example`` outputs to its longest member (right padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(feature["input_ids"]) for feature in features)
        shape = (len(features), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _conversation(example: Example) -> list[dict]:
    if example.messages is not None:
        return [dict(message) for message in example.messages]
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]


def _render(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    return "".join(m["content"] + (eos if m["role"] == "assistant" else "\n") for m in messages)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assistant_spans(tokenizer: Any, messages: list[dict], full: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each assistant turn within ``full`` (its content and end token)."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _token_ids(tokenizer, _render(tokenizer, messages[:index], add_generation_prompt=True))
        through = _token_ids(tokenizer, _render(tokenizer, messages[: index + 1], add_generation_prompt=False))
        start, end = _common_prefix(before, full), _common_prefix(through, full)
        if end > start:
            spans.append((start, end))
    return spans


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _truncate(
    ids: list[int], labels: list[int], answer_start: int, head: int, max_len: int
) -> tuple[list[int], list[int]]:
    """Fit ``max_len``: drop context tokens after the first ``head`` (bos) ones, oldest first,
    but not past ``answer_start``; then cut the end."""
    overflow = len(ids) - max_len
    if overflow <= 0:
        return ids, labels
    drop = min(overflow, max(answer_start - head, 0))
    ids = ids[:head] + ids[head + drop :]
    labels = labels[:head] + labels[head + drop :]
    return ids[:max_len], labels[:max_len]
