"""Engine and sessions for SQLite (the embedded default) and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Connections a pool may open beyond its size, for the short moments when a request that has
# left its thread still holds one (it is given back on the event loop, without a thread).
POOL_OVERFLOW = 10


def make_engine(url: str, pool_size: int = 5, pool_timeout: float = 30.0) -> Engine:
    """An engine whose pool keeps ``pool_size`` connections (the API sizes it to its threads,
    so that a thread never waits for a connection another thread holds) and waits at most
    ``pool_timeout`` seconds for one (then ``sqlalchemy.exc.TimeoutError``)."""
    # LIFO: the connection used last, warm (its caches, its prepared statements), goes out first.
    options = dict(pool_size=pool_size, max_overflow=POOL_OVERFLOW, pool_timeout=pool_timeout, pool_use_lifo=True)
    # A statement's parameters (tenants' names, key hashes, job bodies) stay out of error
    # messages, and so out of the logs that quote them.
    options["hide_parameters"] = True
    if url.startswith("sqlite"):
        # The API and the worker are separate processes writing one file: WAL lets readers
        # go on while one writes, and the busy timeout makes a writer wait instead of failing.
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **options
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # No pre-ping (a round trip on every checkout): a connection the server dropped fails its
    # first statement, which invalidates every connection of the pool; the reads then run once
    # more (auth.TenantReader) and any other request answers 503 (errors.py), never a 500.
    return create_engine(url, **options)


class Database:
    """An engine and its session factory, made once per process from a URL."""

    def __init__(self, url: str, pool_size: int = 5, pool_timeout: float = 30.0):
        self.url = url
        self.engine = make_engine(url, pool_size, pool_timeout)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
