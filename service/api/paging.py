"""Cursor pagination over time-ordered ids (newest first)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query
from sqlalchemy import Select
from sqlalchemy.orm import Session

from service.api.deps import SettingsDep
from service.api.errors import invalid
from service.ids import could_exist


class PageParams:
    def __init__(
        self,
        settings: SettingsDep,
        limit: Annotated[int, Query(ge=1, description="items per page")] = 20,
        after: Annotated[str | None, Query(max_length=100, description="next_cursor of the previous page")] = None,
    ):
        if after is not None and not could_exist(after):
            raise invalid("after", "after: not a cursor (it contains a NUL character); pass the next_cursor of the previous page")
        if limit > settings.page_size_max:
            raise invalid("limit", f"limit: must be at most {settings.page_size_max}")
        self.limit = limit
        self.after = after


PageDep = Annotated[PageParams, Depends()]


def page(session: Session, query: Select, id_column: Any, params: PageParams) -> tuple[list[Any], str | None]:
    """One page of ``query``'s rows, newest first, and the cursor of the next (None at the end)."""
    if params.after is not None:
        query = query.where(id_column < params.after)
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(params.limit + 1)))
    if len(rows) > params.limit:
        rows = rows[: params.limit]
        return rows, rows[-1].id
    return rows, None
