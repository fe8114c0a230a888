"""Logging of every ``rlora`` process: one event per line, JSON lines by default where a log
pipeline reads them, plain text on a terminal, with the context of the work the event belongs to
(request id, tenant id, job id, attempt).

The context lives in a context variable: `log_context` binds fields for a block (a request, a
job's attempt) and every event logged inside it, in any logger, carries them. Threads started
inside the block see it when started with `run_in_context` (asyncio tasks and anyio's worker
threads copy the context themselves). Only ids go there: never keys, tokens or dataset contents.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")

# A request's id travels in this header: from the client (kept when it is a plausible one, so
# that a log line cannot be forged or flooded through it), back in the answer, and on to the
# engine process a generation is forwarded to.
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

# The fields of the work in progress; one dict per bound block, mutated only by `add_to_log_context`
# (the tenant is known only once the request's key is checked, deeper than the block binding it).
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("rlora_log_context", default=None)

# What a LogRecord holds of its own: anything else on a record came from ``extra=`` (but
# uvicorn's message with terminal colours, a copy of the message).
_RECORD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}

# Libraries whose INFO lines are noise to an operator (Alembic's plugin and migration lines on
# every command that checks the schema, Celery's per-task receipts), shown from --log-level debug.
_CHATTY_LOGGERS = ("alembic", "celery.worker.strategy", "celery.app.trace", "kombu", "multipart", "httpx", "httpcore")


@contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Bind ``fields`` (None values left out) to every event logged in this block."""
    bound = {**(_context.get() or {}), **{name: value for name, value in fields.items() if value is not None}}
    token = _context.set(bound)
    try:
        yield bound
    finally:
        _context.reset(token)


def add_to_log_context(**fields: Any) -> None:
    """Add ``fields`` to the block bound by the innermost `log_context` (seen by its caller and
    every thread in it); nothing outside such a block."""
    bound = _context.get()
    if bound is not None:
        bound.update({name: value for name, value in fields.items() if value is not None})


def request_id_from(given: str | None) -> str:
    """``given`` when it is 1 to 128 letters, digits and ``._:-``; else a new id."""
    return given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def current_log_context() -> dict[str, Any]:
    return dict(_context.get() or {})


def run_in_context(target: Callable[..., Any], *args: Any, **kwargs: Any) -> threading.Thread:
    """A thread (not started) that runs ``target`` with the caller's log context."""
    context = contextvars.copy_context()
    return threading.Thread(target=context.run, args=(target, *args), **kwargs)


def _event(record: logging.LogRecord) -> dict[str, Any]:
    fields = {name: value for name, value in vars(record).items() if name not in _RECORD_ATTRIBUTES}
    return {**(_context.get() or {}), **fields}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the bound context,
    ``extra=`` fields, and the exception's traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_event(record),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``, for a person at a terminal."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _event(record)
        if not fields:
            return line
        first, newline, rest = line.partition("\n")  # a traceback stays below the fields
        return first + " " + " ".join(f"{name}={value}" for name, value in fields.items()) + newline + rest


def configure_logging(level: str, log_format: str = "auto", stream: TextIO | None = None) -> None:
    """The root logger of this process: one handler on ``stream`` (stderr) at ``level``, JSON
    lines or text (``auto``: text when the stream is a terminal). Called again, it replaces
    its handler (uvicorn's processes and the worker configure again from the settings)."""
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler._rlora = True  # type: ignore[attr-defined]  # ours, replaced by the next call
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_rlora", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    # uvicorn's own loggers write through the root; its access lines are replaced by ours
    # (service.api.telemetry: one event per request, with its ids).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn as events, not stray stderr lines


def quiet_progress_bars() -> None:
    """No progress bars from transformers and the Hub in a service process or its children: a
    bar on a log stream is a line per update (the trainer reports progress as job events)."""
    # Read by huggingface_hub, and through it transformers, when they are imported ...
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # ... and switched off here where they were imported already.
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
