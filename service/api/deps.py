"""Request dependencies: settings, a database session, the Celery app; and the route class
that gives a sync endpoint's connection back in the endpoint's own thread.

No request may hold a pooled connection while it waits for a thread: with every thread waiting
for a connection that such requests hold, the process would stop answering. So:

- none of these dependencies needs a thread (a sync one would run in the threadpool);
- the session is made without connecting: it connects in the endpoint's thread, at its first
  query;
- a sync endpoint's session is closed in that same thread as the endpoint returns
  (`SessionRoute`), before FastAPI validates the response (in another thread hop);
- the dependency closes it again, on the event loop, for an async endpoint (whose thread work
  closes it itself, see files.py and generate.py) and after an error.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from service.settings import Settings


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.db.sessions()
    try:
        yield session
    finally:
        session.close()  # a no-op once closed; else gives the connection back (a rollback)


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
CeleryDep = Annotated[Celery, Depends(get_celery)]


def closing_sessions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint``, closing the sessions passed to it by keyword in its own thread as it returns."""

    @functools.wraps(endpoint)  # FastAPI reads the parameters through __wrapped__
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()

    run.closes_sessions = True  # type: ignore[attr-defined]
    return run


class SessionRoute(APIRoute):
    """A route whose sync endpoint closes its sessions in its own thread when it returns."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any):
        if not inspect.iscoroutinefunction(endpoint) and not getattr(endpoint, "closes_sessions", False):
            endpoint = closing_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)
