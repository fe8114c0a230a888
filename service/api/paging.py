"""Cursor pagination over ids: objects newest first (after a time-ordered id), a job's
events oldest first (after the last event id seen)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query
from sqlalchemy import Connection, Row, Select

from service.api.deps import SettingsDep
from service.api.errors import invalid
from service.ids import could_exist
from service.settings import Settings


def checked_limit(settings: Settings, limit: int) -> int:
    if limit > settings.page_size_max:
        raise invalid("limit", f"limit: must be at most {settings.page_size_max}")
    return limit


@dataclass(frozen=True)
class PageParams:
    limit: int
    after: str | None
    oldest_first = False  # objects, newest first


@dataclass(frozen=True)
class EventPageParams:
    limit: int
    after: int | None
    # Oldest first: a client follows a job by passing the last id it has seen.
    oldest_first = True


# Dependencies as coroutines: FastAPI runs a plain function (or a class) in the threadpool.


async def page_params(
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, description="items per page")] = 20,
    after: Annotated[str | None, Query(max_length=100, description="next_cursor of the previous page")] = None,
) -> PageParams:
    if after is not None and not could_exist(after):
        raise invalid("after", "after: not a cursor (it contains a NUL character); pass the next_cursor of the previous page")
    return PageParams(limit=checked_limit(settings, limit), after=after)


async def event_page_params(
    settings: SettingsDep,
    after: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="id of the last event seen (event ids are 32-bit)")] = None,
    limit: Annotated[int, Query(ge=1)] = 100,
) -> EventPageParams:
    return EventPageParams(limit=checked_limit(settings, limit), after=after)


PageDep = Annotated[PageParams, Depends(page_params)]
EventPageDep = Annotated[EventPageParams, Depends(event_page_params)]


def page(connection: Connection, query: Select, id_column: Any, params: PageParams | EventPageParams) -> tuple[list[Row], str | None]:
    """One page of ``query``'s rows in the order of ``params``, and the cursor of the next (None at the end)."""
    if params.after is not None:
        query = query.where(id_column > params.after if params.oldest_first else id_column < params.after)
    order = id_column.asc() if params.oldest_first else id_column.desc()
    rows = connection.execute(query.order_by(order).limit(params.limit + 1)).all()
    if len(rows) > params.limit:
        rows = rows[: params.limit]
        return rows, str(rows[-1].id)
    return rows, None
