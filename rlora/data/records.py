"""Reading and validating dataset files.

``validate_dataset`` / ``load_dataset`` read JSONL or a JSON array of records in the three
shapes of docs/design.md section 3 and normalise every record to an ``Example``. The validator
collects every problem it finds (with line or element number and field) instead of stopping
at the first, because the service shows the list to the user who uploaded the file.
`lone_surrogate` is the check for text that is no Unicode (the API applies it to request bodies).
"""

from __future__ import annotations

import codecs
import io
import itertools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO

SHAPES = ("prompt_completion", "alpaca", "chat")
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_TASK = "default"  # summary key (and task, when labels are used) of records without a task
MAX_TASK_CHARS = 100  # a task label's length, as a mixture's task name

_SHOWN_ERRORS = 20
_JSON_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_PEEK_BYTES = 1 << 16
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))  # UTF-8 bytes that go on a character
_LONGEST_ESCAPE = len("\\u0000")
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_SEPARATOR = re.compile(r"[ \t\r\n]*([,\]])[ \t\r\n]*")
_STRING_END_OR_ESCAPE = re.compile(r'["\\]')
_QUOTE_OR_BRACKET = re.compile(r'["\[\]{}]')
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
    ``role`` and ``content`` kept, and ``weight`` 0 on an assistant turn that is context, not
    learned, as OpenAI's chat format marks it) and is what gets tokenized; ``answer`` is its final
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
    max_record_messages: int | None = None,
    max_errors: int = 100,
) -> tuple[list[Example], DatasetSummary]:
    """Read and check a dataset; return its examples and a summary, or raise with every problem.

    ``data`` is the file's content as ``bytes``, or a path (``str`` or ``os.PathLike``; a
    ``str`` is always a path, never content). JSONL is read line by line and a JSON array (the
    first non-whitespace byte is ``[``) element by element, so no more than the largest record
    is held at once besides the examples returned. A UTF-8 byte-order mark is tolerated.

    Raises ``DatasetValidationError`` listing up to ``max_errors`` problems (all of them are
    counted): bad JSON, a record that is not an object, an unknown or ambiguous shape, missing
    or mistyped fields, an empty answer, a bad chat role, a conversation not ending with the
    assistant, non-UTF-8 bytes, a record longer than ``max_record_chars`` or a chat record
    of more than ``max_record_messages`` messages (None: any number), and an empty file.
    """
    records = _read_dataset(data, max_record_chars, max_record_messages, max_errors, keep_examples=True)
    return records.examples, records.summary


def check_dataset(
    data: bytes | str | os.PathLike, *, max_record_chars: int = 100_000, max_record_messages: int | None = None,
    max_errors: int = 100,
) -> DatasetSummary:
    """``validate_dataset`` keeping no examples: memory follows the largest record, not the
    file (the service checks uploads with it)."""
    return _read_dataset(data, max_record_chars, max_record_messages, max_errors, keep_examples=False).summary


def load_dataset(path: str | os.PathLike) -> list[Example]:
    """The examples of a valid dataset file (``validate_dataset`` without the summary)."""
    return validate_dataset(path)[0]


class _Records:
    """The valid records of a file: counted by task and shape, their examples kept if asked."""

    def __init__(self, keep_examples: bool, max_messages: int | None):
        self.keep_examples = keep_examples
        self.max_messages = max_messages  # the most messages a chat record may hold (None: any)
        self.examples: list[Example] = []
        self.count = 0
        self.tasks: Counter[str] = Counter()
        self.shapes: Counter[str] = Counter()
        self.summary: DatasetSummary | None = None

    def add(self, example: Example, shape: str) -> None:
        self.count += 1
        self.tasks[example.task or DEFAULT_TASK] += 1
        self.shapes[shape] += 1
        if self.keep_examples:
            self.examples.append(example)


def _read_dataset(
    data: bytes | str | os.PathLike, max_record_chars: int, max_record_messages: int | None, max_errors: int, keep_examples: bool
) -> _Records:
    if isinstance(data, (bytes, bytearray)):
        stream: BinaryIO = io.BytesIO(bytes(data))
    else:
        stream = open(os.fspath(data), "rb")
    with stream:
        return _validate_stream(stream, max_record_chars, _Collector(max_errors), _Records(keep_examples, max_record_messages))


def _validate_stream(stream: BinaryIO, max_record_chars: int, errors: _Collector, records: _Records) -> _Records:
    if stream.read(len(_BOM)) != _BOM:
        stream.seek(0)
    fmt = _detect_format(stream)
    if fmt == "json":
        _read_array(stream, max_record_chars, errors, records)
    elif fmt == "jsonl":
        _read_lines(stream, max_record_chars, errors, records)
    if not records.count and not errors.total:
        errors.add(None, None, None, "empty file: no records")
    if errors.total:
        raise DatasetValidationError(errors.errors, errors.total)
    records.summary = DatasetSummary(format=fmt, records=records.count, tasks=dict(records.tasks), shapes=dict(records.shapes))
    return records


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


def _chars(data: bytes) -> int:
    """How many characters UTF-8 ``data`` holds: its bytes that start one."""
    return len(data.translate(None, _CONTINUATION_BYTES))


def _read_lines(stream: BinaryIO, max_chars: int, errors: _Collector, records: _Records) -> None:
    # A line is read whole only up to the most bytes max_chars characters (4 bytes each at
    # most) and "\r\n" can take; a longer one is over the limit, counted and passed over in
    # pieces, never held.
    read_limit = 4 * max_chars + 3
    for number in itertools.count(1):
        raw = stream.readline(read_limit)
        if not raw:
            return
        if len(raw) == read_limit and not raw.endswith(b"\n"):
            chars, tail = _chars(raw), raw[-2:]
            while not raw.endswith(b"\n") and (raw := stream.readline(_PEEK_BYTES)):
                chars, tail = chars + _chars(raw), (tail + raw)[-2:]
            chars -= len(tail) - len(tail.rstrip(b"\r\n"))  # the line's end is no character of the record
            errors.add(number, None, None, _too_long(chars, max_chars))
            continue
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


def _report_non_utf8_lines(stream: BinaryIO, errors: _Collector) -> bool:
    """Report each line that is not UTF-8 (and the byte where it fails), reading in chunks;
    whether there was one. Leaves the stream where it was."""
    start = stream.tell()
    found = bad_line = False
    line, line_bytes, carry = 1, 0, b""
    while chunk := stream.read(_PEEK_BYTES):
        pieces = chunk.split(b"\n")
        for index, piece in enumerate(pieces):
            ends_line = index < len(pieces) - 1
            data, carry = carry + piece, b""
            if not bad_line:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as err:
                    if not ends_line and err.end == len(data) and err.reason == "unexpected end of data":
                        carry = data[err.start:]  # a character cut by the chunk's end: whole in the next
                    else:
                        errors.add(line, None, None, f"not valid UTF-8 (byte {line_bytes + err.start + 1} of the line)")
                        found = bad_line = True
            line_bytes += len(data) - len(carry)
            if ends_line:
                line, line_bytes, bad_line = line + 1, 0, False
    if carry and not bad_line:
        errors.add(line, None, None, f"not valid UTF-8 (byte {line_bytes + 1} of the line)")
        found = True
    stream.seek(start)
    return found


class _TextWindow:
    """A stream's text read in chunks, held from the current position ``pos`` on (what lies
    before it is dropped at the next read): memory follows what a caller asks to see at once,
    not the file. Knows the line of ``pos`` and the line and column of any position held."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        self.line = 1  # of text[pos]
        self._first_column = 0  # characters on text[0]'s line before it
        self.eof = False

    def fill(self, chars: int) -> None:
        """At least ``chars`` characters from ``pos`` on in ``text``, or all the stream has left."""
        while len(self.text) - self.pos < chars and not self.eof:
            data = self._stream.read(_PEEK_BYTES)
            self.eof = not data
            last_newline = self.text.rfind("\n", 0, self.pos)
            self._first_column = self.pos - last_newline - 1 if last_newline >= 0 else self._first_column + self.pos
            self.text = self.text[self.pos:] + self._decoder.decode(data, final=self.eof)
            self.pos = 0

    def advance(self, position: int) -> None:
        self.line += self.text.count("\n", self.pos, position)
        self.pos = position

    def line_and_column(self, position: int) -> tuple[int, int]:
        last_newline = self.text.rfind("\n", 0, position)
        column = position - last_newline if last_newline >= 0 else self._first_column + position + 1
        return self.line + self.text.count("\n", self.pos, position), column

    def skip_whitespace(self) -> None:
        while True:
            self.advance(_WHITESPACE.match(self.text, self.pos).end())
            if self.pos < len(self.text) or self.eof:
                return
            self.fill(1)

    def next_char(self) -> str:
        """The character at ``pos`` ("" at the end of the stream)."""
        self.fill(1)
        return self.text[self.pos:self.pos + 1]

    def skip_value(self) -> int | None:
        """Move past the string, object or array at ``pos`` without parsing it, however long;
        its length in characters, or None when the stream ends inside it."""
        length, depth, in_string = 0, 0, False
        position = self.pos
        while True:
            position, depth, in_string, done = _scan_value(self.text, position, len(self.text), depth, in_string)
            length += position - self.pos
            self.advance(position)
            if done:
                return length
            self.fill(2)  # two: an escape cut by the end of the text is scanned whole
            if len(self.text) - self.pos < 2 and self.eof:
                return None
            position = self.pos


def _scan_value(text: str, position: int, stop: int, depth: int, in_string: bool) -> tuple[int, int, bool, bool]:
    """Scan a JSON string, object or array from ``position`` towards ``stop`` by its quotes,
    escapes and brackets; where it stopped, the state to go on from, and whether the value
    ended there (it is then just past it). Only where the value ends; not whether it is valid."""
    while position < stop:
        if in_string:
            found = _STRING_END_OR_ESCAPE.search(text, position, stop)
            if found is None:
                return stop, depth, in_string, False
            position = found.start()
            if text[position] == "\\":
                if position + 1 >= stop:
                    return position, depth, in_string, False
                position += 2
                continue
            in_string, position = False, position + 1
            if depth == 0:
                return position, depth, in_string, True
        else:
            found = _QUOTE_OR_BRACKET.search(text, position, stop)
            if found is None:
                return stop, depth, in_string, False
            char, position = found.group(), found.end()
            if char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
            else:
                depth -= 1
                if depth <= 0:
                    return position, depth, in_string, True
    return position, depth, in_string, False


def _read_array(stream: BinaryIO, max_chars: int, errors: _Collector, records: _Records) -> None:
    """Parse the array element by element from a window of its text that reaches just past
    the longest record allowed, so each element's line is known, a syntax error names the
    element it is in, and no more than one record is held. A file that is not UTF-8 is
    reported by its lines alone."""
    if _report_non_utf8_lines(stream, errors):
        return
    window = _TextWindow(stream)
    decoder = json.JSONDecoder()
    window.skip_whitespace()
    window.advance(window.pos + 1)  # the "[" _detect_format found
    window.skip_whitespace()
    if window.next_char() == "]":
        window.advance(window.pos + 1)
    else:
        for element in itertools.count():
            line = window.line
            window.fill(max_chars + 1)
            try:
                value, end = decoder.raw_decode(window.text, window.pos)
            except json.JSONDecodeError as err:
                # Longer than the window: too long to be a record, whether or not it is valid.
                too_long = _cut_by_window(window, err) and window.text[window.pos] in ('"', "{", "[")
                if not too_long:
                    error_line, column = window.line_and_column(err.pos)
                    errors.add(error_line, element, None, f"invalid JSON: {err.msg} (column {column})")
                    return
                chars = window.skip_value()
                if chars is None:
                    errors.add(line, element, None, "invalid JSON: the element does not end before the end of the file")
                    return
                errors.add(line, element, None, _too_long(chars, max_chars))
            except (RecursionError, ValueError) as err:
                errors.add(line, element, None, _json_error(err))
                return
            else:
                if end - window.pos > max_chars:
                    errors.add(line, element, None, _too_long(end - window.pos, max_chars))
                else:
                    _accept(value, line, element, errors, records)
                # Most often the separator and the whitespace around it are in the window
                # already: one match then, instead of a step for each.
                after = _SEPARATOR.match(window.text, end)
                if after is not None and after.end() < len(window.text):
                    window.advance(after.end())
                    if after.group(1) == ",":
                        continue
                    break
                window.advance(end)
            window.skip_whitespace()
            separator = window.next_char()
            if separator not in (",", "]"):
                found = "end of file" if not separator else repr(separator)
                message = f"invalid JSON: expected ',' or ']' after the element, found {found}"
                errors.add(window.line, element, None, message)
                return
            window.advance(window.pos + 1)
            window.skip_whitespace()
            if separator == "]":
                break
    window.skip_whitespace()
    if window.next_char():
        errors.add(window.line, None, None, "invalid JSON: unexpected data after the array")


def _cut_by_window(window: _TextWindow, err: json.JSONDecodeError) -> bool:
    """Whether parsing failed only because the window ends inside the element: the text ran
    out (at its end, or inside a string), and the stream has more."""
    if window.eof:
        return False
    return err.pos >= len(window.text) - _LONGEST_ESCAPE or err.msg.startswith("Unterminated string")


def _too_long(chars: int, limit: int) -> str:
    return f"record is {chars} characters, over the limit of {limit}"


def _accept(value: Any, line: int | None, element: int | None, errors: _Collector, records: _Records) -> None:
    """Normalise one parsed record, or report its problems. Examples stop being kept once the
    file is known to be invalid: they would be thrown away."""
    problems: list[tuple[str | None, str]] = []
    parsed = _normalize(value, records.max_messages, problems)
    for field, message in problems:
        errors.add(line, element, field, message)
    if parsed is not None and not errors.total:
        records.add(*parsed)


def _normalize(record: Any, max_messages: int | None, problems: list[tuple[str | None, str]]) -> tuple[Example, str] | None:
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
        example = _chat(record, task, max_messages, problems)
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
        turn = {"role": role, "content": content}
        if "weight" in message and message["weight"] is not None:
            weight = message["weight"]
            if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                where = "must be 0 or 1" if role == "assistant" else "is only for assistant messages"
                problems.append((f"{name}.weight", f"{where} (got {weight!r})"))
            elif weight == 0:
                turn["weight"] = 0  # a turn given as context, not learned (OpenAI's chat format)
        normalized.append(turn)
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") in CHAT_ROLES and last["role"] != "assistant":
        problems.append(("messages", "the last message must be the assistant's (it is the answer)"))
    elif not problems and all(turn.get("weight") == 0 for turn in normalized if turn["role"] == "assistant"):
        problems.append(("messages", "every assistant message has weight 0: there is nothing to learn"))
    if problems:
        return None
    prompt = normalized[-2]["content"] if len(normalized) > 1 else ""
    return Example(prompt=prompt, answer=normalized[-1]["content"], task=task, messages=tuple(normalized))


def _task(record: dict, problems: list) -> str | None:
    """The record's task label: its ``task`` (``task_type`` is accepted as an alias, as
    Alpaca-style sets use) as a string; an integer stands for its decimal string (HydraLoRA's
    sets number their tasks), and null, an empty or a blank string mean no label."""
    name = "task" if "task" in record else "task_type"
    value = record.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        problems.append((name, f"must be a string or an integer, got {_json_type(value)}"))
        return None
    if len(value) > MAX_TASK_CHARS:
        problems.append((name, f"a task label has at most {MAX_TASK_CHARS} characters, got {len(value)}"))
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
