"""Reading and validating dataset files.

``validate_dataset`` / ``load_dataset`` read JSONL or a JSON array of records in the three
shapes of docs/design.md section 3 and normalise every record to an ``Example``. The validator
collects every problem it finds (with line or element number and field) instead of stopping
at the first, because the service shows the list to the user who uploaded the file.
`lone_surrogate` is the check for text that is no Unicode (the API applies it to request bodies).
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO

SHAPES = ("prompt_completion", "alpaca", "chat")
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_TASK = "default"  # summary key for records without a task

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


@dataclass(frozen=True)
class _Limits:
    """The most one record may hold: characters (of its JSON text), and messages (chat)."""

    chars: int
    messages: int | None


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
    max_record_messages: int | None = None,
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
    assistant, non-UTF-8 bytes, a record longer than ``max_record_chars`` or a chat record
    of more than ``max_record_messages`` messages (None: any number), and an empty file.
    """
    if isinstance(data, (bytes, bytearray)):
        stream: BinaryIO = io.BytesIO(bytes(data))
    else:
        stream = open(os.fspath(data), "rb")
    with stream:
        return _validate_stream(stream, _Limits(max_record_chars, max_record_messages), _Collector(max_errors))


def load_dataset(path: str | os.PathLike) -> list[Example]:
    """The examples of a valid dataset file (``validate_dataset`` without the summary)."""
    return validate_dataset(path)[0]


def _validate_stream(
    stream: BinaryIO, limits: _Limits, errors: _Collector
) -> tuple[list[Example], DatasetSummary]:
    if stream.read(len(_BOM)) != _BOM:
        stream.seek(0)
    fmt = _detect_format(stream)
    records: list[tuple[Example, str]] = []
    if fmt == "json":
        _read_array(stream, limits, errors, records)
    elif fmt == "jsonl":
        _read_lines(stream, limits, errors, records)
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
    stream: BinaryIO, limits: _Limits, errors: _Collector, records: list[tuple[Example, str]]
) -> None:
    for number, raw in enumerate(stream, start=1):
        if not raw.strip(_JSON_WHITESPACE):
            continue
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            errors.add(number, None, None, f"not valid UTF-8 (byte {err.start + 1} of the line)")
            continue
        if len(text) > limits.chars:
            errors.add(number, None, None, _too_long(len(text), limits.chars))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            errors.add(number, None, None, f"invalid JSON: {err.msg} (column {err.colno})")
            continue
        except (RecursionError, ValueError) as err:
            errors.add(number, None, None, _json_error(err))
            continue
        _accept(value, number, None, limits, errors, records)


def _read_array(
    stream: BinaryIO, limits: _Limits, errors: _Collector, records: list[tuple[Example, str]]
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
            if end - position > limits.chars:
                errors.add(line, element, None, _too_long(end - position, limits.chars))
            else:
                _accept(value, line, element, limits, errors, records)
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
    value: Any, line: int | None, element: int | None, limits: _Limits, errors: _Collector,
    records: list[tuple[Example, str]],
) -> None:
    """Normalise one parsed record, or report its problems. Examples stop being kept once the
    file is known to be invalid: they would be thrown away."""
    problems: list[tuple[str | None, str]] = []
    parsed = _normalize(value, limits, problems)
    for field, message in problems:
        errors.add(line, element, field, message)
    if parsed is not None and not errors.total:
        records.append(parsed)


def _normalize(record: Any, limits: _Limits, problems: list[tuple[str | None, str]]) -> tuple[Example, str] | None:
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
        example = _chat(record, task, limits.messages, problems)
    return None if example is None else (example, shape)


def _alpaca(record: dict, task: str | None, problems: list) -> Example | None:
    instruction = _string(record, "instruction", problems)
    extra = _string(record, "input", problems, non_empty=False, required=False) or ""
    answer = _string(record, "output", problems)
    if problems:
        return None
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(prompt=prompt, answer=answer, task=task)


def _chat(record: dict, task: str | None, max_messages: int | None, problems: list) -> Example | None:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        kind = "an empty array" if isinstance(messages, list) else _json_type(messages)
        problems.append(("messages", f"must be a non-empty array of messages, got {kind}"))
        return None
    if max_messages is not None and len(messages) > max_messages:
        problems.append(("messages", f"has {len(messages)} messages, over the limit of {max_messages}"))
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
    surrogate = lone_surrogate(value)
    if surrogate is not None:
        problems.append((prefix + name, f"contains an unpaired surrogate \\u{ord(value[surrogate]):04x} (character {surrogate + 1}): not valid Unicode text"))
        return None
    return value


def lone_surrogate(text: str) -> int | None:
    """Where ``text`` has a lone UTF-16 surrogate (JSON's ``"\\ud800"`` parses to one), or None.

    Such a string is no Unicode text: it cannot be encoded, tokenized, stored or sent back."""
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
