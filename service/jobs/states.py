"""The job state machine: the one place that changes a job's status.

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled
    running -> queued            (the worker was lost; training resumes from its checkpoint)

Every transition is a compare-and-set ``UPDATE ... WHERE status = :expected``: of two
processes racing for the same job exactly one wins, and the loser learns it from the row
count instead of overwriting the winner.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.models import Job, JobEvent, JobFile, utcnow


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (Status.QUEUED, Status.RUNNING)
TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

TRANSITIONS = {
    (Status.QUEUED, Status.RUNNING),
    (Status.QUEUED, Status.CANCELLED),
    (Status.RUNNING, Status.SUCCEEDED),
    (Status.RUNNING, Status.FAILED),
    (Status.RUNNING, Status.CANCELLED),
    (Status.RUNNING, Status.QUEUED),
}


class InvalidTransition(Exception):
    def __init__(self, job_id: str, current: str, wanted: str):
        super().__init__(f"job {job_id} is {current}; it cannot become {wanted}")
        self.job_id = job_id
        self.current = current
        self.wanted = wanted


def transition(
    session: Session,
    job_id: str,
    expected: Status,
    new: Status,
    *,
    attempt: int | None = None,
    **values: Any,
) -> bool:
    """Move ``job_id`` from ``expected`` to ``new``, setting ``values``; True if this call won.

    ``attempt`` restricts the change to the worker holding that claim. The caller commits.
    """
    if (expected, new) not in TRANSITIONS:
        raise InvalidTransition(job_id, expected, new)
    if new in TERMINAL:
        values.setdefault("finished_at", utcnow())
    query = update(Job).where(Job.id == job_id, Job.status == expected)
    if attempt is not None:
        query = query.where(Job.attempt == attempt)
    result = session.execute(query.values(status=new, **values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def claim(session: Session, job_id: str, worker: str) -> int | None:
    """queued -> running for ``worker``; the attempt number it holds, or None if another won."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != Status.QUEUED:
        return None
    attempt = job.attempt + 1
    now = utcnow()
    won = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == Status.QUEUED, Job.attempt == job.attempt)
        .values(status=Status.RUNNING, attempt=attempt, worker=worker, heartbeat_at=now, started_at=job.started_at or now)
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    if won:
        add_event(session, job, "started", {"attempt": attempt, "worker": worker})
    session.commit()
    return attempt if won else None


def cancel(session: Session, job: Job) -> Status:
    """Cancel a queued job at once, or ask a running one to stop; the status it then has.

    Raises ``InvalidTransition`` for a job that already ended. The status may change between
    reading and writing (a worker claims the job, or loses it), so the loop retries with the
    status found; each turn changes nothing unless its compare-and-set wins.
    """
    for _ in range(5):
        session.refresh(job)
        if job.status == Status.QUEUED:
            if transition(session, job.id, Status.QUEUED, Status.CANCELLED, cancel_requested=True):
                add_event(session, job, "finished", {"status": Status.CANCELLED})
                session.commit()
                return Status.CANCELLED
        elif job.status == Status.RUNNING:
            flagged = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == Status.RUNNING)
                .values(cancel_requested=True)
                .execution_options(synchronize_session=False)
            ).rowcount == 1
            if flagged:
                add_event(session, job, "cancel_requested", {})
                session.commit()
                return Status.RUNNING
        else:
            raise InvalidTransition(job.id, job.status, Status.CANCELLED)
        session.rollback()
    raise InvalidTransition(job.id, job.status, Status.CANCELLED)


def requeue_lost(session: Session, job: Job, reason: str) -> Status | None:
    """A running job whose worker is gone goes back to the queue (or ends, if cancelled).

    Returns the new status, or None if the job changed meanwhile.
    """
    if job.cancel_requested:
        won = transition(session, job.id, Status.RUNNING, Status.CANCELLED, attempt=job.attempt)
        new = Status.CANCELLED
    else:
        won = transition(session, job.id, Status.RUNNING, Status.QUEUED, attempt=job.attempt, enqueued_at=utcnow(), worker=None)
        new = Status.QUEUED
    if not won:
        session.rollback()
        return None
    add_event(session, job, "finished" if new == Status.CANCELLED else "requeued", {"status": new, "reason": reason})
    session.commit()
    return new


def touch_enqueued(session: Session, job: Job, at: datetime) -> bool:
    """Record that a queued job's message was sent again, unless another process just did."""
    won = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == Status.QUEUED, Job.enqueued_at == job.enqueued_at)
        .values(enqueued_at=at)
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    session.commit()
    return won


def add_event(session: Session, job: Job, kind: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job.id, tenant_id=job.tenant_id, kind=kind, data=data))


def active_jobs_using_file(session: Session, tenant_id: str, file_id: str) -> list[str]:
    return list(
        session.scalars(
            select(Job.id)
            .join(JobFile, JobFile.job_id == Job.id)
            .where(JobFile.tenant_id == tenant_id, JobFile.file_id == file_id, Job.status.in_(ACTIVE))
        )
    )
