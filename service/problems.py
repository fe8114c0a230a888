"""Problems with an input as ``{"field", "message"}`` dicts: what the job domain reports and
the API's 422 carries, with pydantic's error locations as field paths."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rlora.training.config import field_path as format_location

# FastAPI locates a request's errors in a part of the request first; a field's path starts after it.
_REQUEST_PARTS = ("body", "query", "path", "header")


def field_path(loc: Sequence[Any]) -> str:
    """``("body", "mixture", 0, "file_id")`` -> ``mixture[0].file_id``."""
    parts = list(loc)
    return format_location(parts[1:] if parts and parts[0] in _REQUEST_PARTS else parts)


def validation_problems(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's (or FastAPI's) validation errors as problems; one without a field has none."""
    problems = []
    for error in errors:
        path = field_path(error["loc"])
        problems.append({"field": path, "message": error["msg"]} if path else {"message": error["msg"]})
    return problems
