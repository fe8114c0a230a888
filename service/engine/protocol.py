"""The wire format between API processes and `rlora engine`, in one place.

``POST /generate`` takes ``{"inputs", "parameters", "adapter_id", "adapter_path",
"base_model"}`` (``parameters``: `GenerationParams` as a dict). A request the engine refuses is
answered at once with an error status and ``{"error": {...}}``; an accepted one with a stream
of JSON lines, ``{"event": ...}`` per token (`StreamEvent` by `dataclasses.asdict`, the last
with its whole `GenerationResult`), or, when the request fails after its stream began, a last
line ``{"error": {...}}``.

An error is ``{"type", "message"}`` plus what its class needs to be made again, so the API
process raises the very exception the in-process engine would have raised (with its message
and ``field``), and maps it to the same HTTP answer.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rlora.adapter.folder import AdapterMismatchError
from rlora.basemodels import UnknownBaseModel
from rlora.serve import (
    AdapterUnusable,
    AdapterTooLarge,
    EngineClosed,
    EngineOverloaded,
    GenerationResult,
    GenerationValidationError,
    NonFiniteScores,
    RequestCancelled,
    RequestFailed,
    StreamEvent,
    Token,
)

TOKEN_HEADER = "X-Rlora-Engine-Token"
MEDIA_TYPE = "application/x-ndjson"


class RemoteEngineError(RuntimeError):
    """A failure inside an engine process that has no exception class of its own here."""


# The errors that travel as themselves, with the status of an engine's refusal (for its logs;
# the API process goes by the type).
REFUSAL_STATUS: dict[type[BaseException], int] = {
    GenerationValidationError: 422,
    AdapterMismatchError: 422,
    AdapterUnusable: 422,
    AdapterTooLarge: 507,
    FileNotFoundError: 404,
    UnknownBaseModel: 404,
    EngineOverloaded: 429,
    EngineClosed: 503,
}
# Errors after a request was accepted: NonFiniteScores before RequestFailed (its base class).
_BY_NAME = {cls.__name__: cls for cls in [*REFUSAL_STATUS, RequestCancelled, NonFiniteScores, RequestFailed]}


def refusal_status(error: BaseException) -> int:
    return next(status for cls, status in REFUSAL_STATUS.items() if isinstance(error, cls))


def event_line(event: StreamEvent) -> bytes:
    return _line({"event": dataclasses.asdict(event)})


def error_line(error: BaseException) -> bytes:
    return _line({"error": error_json(error)})


def _line(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def error_json(error: BaseException) -> dict[str, Any]:
    if isinstance(error, GenerationValidationError):
        return {"type": "GenerationValidationError", "message": error.message, "field": error.field}
    if isinstance(error, UnknownBaseModel):
        return {"type": "UnknownBaseModel", "message": str(error), "name": error.name, "available": error.available}
    known = next((cls for cls in _BY_NAME.values() if isinstance(error, cls)), None)
    return {"type": known.__name__ if known else type(error).__name__, "message": str(error)}


def error_from_json(data: dict[str, Any]) -> BaseException:
    kind, message = data.get("type"), data.get("message", "")
    if kind == "GenerationValidationError":
        return GenerationValidationError(data["field"], message)
    if kind == "UnknownBaseModel":
        return UnknownBaseModel(data["name"], data["available"])
    cls = _BY_NAME.get(kind)
    return cls(message) if cls else RemoteEngineError(f"{kind}: {message}")


def _token(data: dict[str, Any]) -> Token:
    return Token(**data)


def _result(data: dict[str, Any]) -> GenerationResult:
    return GenerationResult(**{
        **data, "tokens": [_token(t) for t in data["tokens"]], "prefill": [_token(t) for t in data["prefill"]],
    })


def event_from_json(data: dict[str, Any]) -> StreamEvent:
    result = data["result"]
    return StreamEvent(
        index=data["index"], token=_token(data["token"]), generated_text=data["generated_text"],
        result=None if result is None else _result(result),
    )
