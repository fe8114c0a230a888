"""Which job starts when a worker is free, and the per-tenant limits, enforced under locks.

A worker holding a token of queue Q claims, in one transaction, the oldest queued job of Q
of the tenant whose last job started longest ago (a tenant never served first), skipping
tenants already running ``max_running`` jobs: one tenant's backlog cannot starve another.

Locks: on PostgreSQL the job row (``FOR UPDATE SKIP LOCKED``, so concurrent workers take
different jobs) and the tenant's row (``FOR UPDATE``, around a tenant's counts); SQLite has
one writer at a time, so a transaction that counts and then writes takes the write lock
first (``BEGIN IMMEDIATE``), and the counts it reads stay true until it commits.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, aliased

from service.jobs import states
from service.jobs.states import Status
from service.models import Job, Tenant, utcnow

# The advisory lock key of the token top-up (the migrations, migrations/env.py, have another).
TOP_UP_LOCK_KEY = int.from_bytes(b"rlora.tp", "big")


def _is_sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def _begin_write(session: Session) -> None:
    """SQLite: take the database's write lock now, for the rest of this transaction. Must
    come before the transaction's first write (Python's sqlite3 begins one implicitly there)."""
    if session.connection().connection.dbapi_connection.in_transaction:
        # Too late: BEGIN would fail, and the counts read so far could be stale by the write.
        raise RuntimeError("the SQLite write lock must be taken before the transaction's first write")
    session.execute(text("BEGIN IMMEDIATE"))


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Until this transaction ends, no other one counts or changes the tenant's jobs under
    this lock: the caller may count them, then write, and the count still holds."""
    if _is_sqlite(session):
        _begin_write(session)
    else:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def active_jobs(session: Session, tenant_id: str) -> int:
    """Queued plus running jobs of the tenant."""
    return session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(states.ACTIVE)))


def _running_jobs(session: Session, tenant_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status == Status.RUNNING))


def _next_job_query(queue: str, max_running: int, passed_over: set[str]):
    running = aliased(Job)
    running_count = (
        select(func.count()).select_from(running)
        .where(running.tenant_id == Job.tenant_id, running.status == Status.RUNNING)
        .scalar_subquery()
    )
    return (
        select(Job)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(Job.status == Status.QUEUED, Job.queue == queue, running_count < max_running, Job.tenant_id.not_in(passed_over))
        .order_by(Tenant.last_started_at.asc().nulls_first(), Job.created_at, Job.id)
        .limit(1)
        .with_for_update(of=Job, skip_locked=True)
    )


def claim_next(session: Session, queue: str, worker: str, max_running: int) -> tuple[Job, int] | None:
    """queued -> running for ``worker``: the next job of ``queue`` by tenant fairness, and the
    attempt it holds; None (and nothing changed) if no job of ``queue`` may start. Committed."""
    if _is_sqlite(session):
        _begin_write(session)
    passed_over: set[str] = set()
    while (job := session.scalar(_next_job_query(queue, max_running, passed_over))) is not None:
        lock_tenant_row = select(Tenant).where(Tenant.id == job.tenant_id).with_for_update()
        tenant = session.scalar(lock_tenant_row)
        # Counted again under the tenant's lock: another worker may have started one of its
        # jobs between the choice and the lock (PostgreSQL; SQLite serialised both already).
        if _running_jobs(session, tenant.id) >= max_running:
            passed_over.add(tenant.id)
            continue
        attempt = states.start(session, job.id, worker)
        if attempt is None:  # the row is locked by this transaction; only a bug gets here
            break
        tenant.last_started_at = utcnow()
        session.commit()
        return job, attempt
    session.rollback()
    return None


def startable_jobs(session: Session, queues: list[str], max_running: int) -> dict[str, int]:
    """Per queue, how many of its queued jobs could start now: a tenant's queued jobs count up
    to the running slots it has left (a slot may be counted in two queues: a spare token
    only finds nothing to start)."""
    running = dict(session.execute(
        select(Job.tenant_id, func.count()).where(Job.status == Status.RUNNING).group_by(Job.tenant_id)
    ).tuples().all())
    queued = session.execute(
        select(Job.queue, Job.tenant_id, func.count())
        .where(Job.status == Status.QUEUED, Job.queue.in_(queues))
        .group_by(Job.queue, Job.tenant_id)
    ).tuples()
    counts = dict.fromkeys(queues, 0)
    for queue, tenant_id, count in queued:
        counts[queue] += min(count, max(0, max_running - running.get(tenant_id, 0)))
    return counts


@contextmanager
def top_up_lock(session: Session) -> Iterator[bool]:
    """One process at a time compares the broker's tokens with the startable jobs and sends
    the difference (else two would both send it); yields False if another one is doing it now.

    Held while the tokens are sent, so it must not be the database's write lock on SQLite (every
    submission, claim and heartbeat would wait on the broker): there, a file lock beside the
    database, since every process of an SQLite service shares one host.
    """
    if not _is_sqlite(session):
        yield bool(session.scalar(select(func.pg_try_advisory_xact_lock(TOP_UP_LOCK_KEY))))
        return
    database = session.get_bind().url.database
    if not database or database == ":memory:":
        yield True  # a private database: no other process tops it up
        return
    with open(f"{database}.top-up.lock", "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
