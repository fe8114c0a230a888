"""Problems with an input as ``{"field", "message"}`` dicts: what the job domain reports and
the API's 422 carries, with pydantic's error locations as field paths."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rlora.training.config import field_path as format_location

# FastAPI locates a request's errors in a part of the request first; a field's path starts after it.
_REQUEST_PARTS = ("body", "query", "path", "header")


# pydantic locates an error inside a member of a union (``str | list[str]``) by the member's type
# (``stop.str``, ``prompt.list[int]``): no field of the request, so not part of its path.
_UNION_MEMBER = re.compile(r"^(?:str|int|float|bool|none|constrained-\w+|(?:list|dict|tuple|literal)\[.*\])$")


def field_path(loc: Sequence[Any]) -> str:
    """``("body", "mixture", 0, "file_id")`` -> ``mixture[0].file_id``."""
    parts = [part for part in loc if not (isinstance(part, str) and _UNION_MEMBER.match(part))]
    return format_location(parts[1:] if parts and parts[0] in _REQUEST_PARTS else parts)


def validation_problems(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's (or FastAPI's) validation errors as problems; one without a field has none.
    A value that fits no member of a union is one problem (the first member's), not one per member."""
    problems = []
    seen: set[str] = set()
    for error in errors:
        path = field_path(error["loc"])
        if path in seen:
            continue
        seen.add(path)
        problems.append({"field": path, "message": error["msg"]} if path else {"message": error["msg"]})
    return problems
