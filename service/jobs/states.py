"""The job state machine: the one place that changes a job's status, and that writes to a
job only while its status (and the worker's attempt) is the one expected.

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled
    running -> queued            (the worker was lost or stopped; training resumes from its checkpoint)
    running -> failed            (also: its worker was lost too many times)

Every transition, heartbeat and progress write is one compare-and-set (``_set_if``),
``UPDATE ... WHERE status = :expected``: of two processes racing for the same job exactly one
wins, and the loser learns it from the row count instead of overwriting the winner.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import or_, select, update
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


def _set_if(session: Session, job_id: str, expected: Status, values: dict[str, Any], *conditions: Any) -> bool:
    """The one compare-and-set: ``values`` are written only while the job is ``expected`` (and
    ``conditions`` hold); True if this call wrote them. The caller commits."""
    query = update(Job).where(Job.id == job_id, Job.status == expected, *conditions)
    return session.execute(query.values(**values).execution_options(synchronize_session=False)).rowcount == 1


def _attempt_is(attempt: int | None) -> tuple[Any, ...]:
    return () if attempt is None else (Job.attempt == attempt,)


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

    ``attempt`` restricts the change to the worker holding that claim. A job asked to cancel
    can neither succeed (the request may arrive while its adapter is being saved) nor go back
    to the queue (while its worker stops). The caller commits.
    """
    if (expected, new) not in TRANSITIONS:
        raise InvalidTransition(job_id, expected, new)
    if new in TERMINAL:
        values.setdefault("finished_at", utcnow())
    values.setdefault("phase", None)  # a phase is a running attempt's; the trainer sets it
    conditions = _attempt_is(attempt)
    if new == Status.SUCCEEDED or (expected, new) == (Status.RUNNING, Status.QUEUED):
        conditions += (Job.cancel_requested.is_(False),)
    return _set_if(session, job_id, expected, {"status": new, **values}, *conditions)


def _move(
    session: Session,
    job: Job,
    expected: Status,
    new: Status,
    kind: str,
    data: dict[str, Any],
    *,
    attempt: int | None = None,
    **values: Any,
) -> bool:
    """``transition`` with its event (``{"status": new, **data}``), committed; rolled back if it lost."""
    if not transition(session, job.id, expected, new, attempt=attempt, **values):
        session.rollback()
        return False
    add_event(session, job, kind, {"status": new, **data})
    session.commit()
    return True


def start(session: Session, job_id: str, worker: str) -> int | None:
    """queued -> running for ``worker``, uncommitted; the attempt number it holds, or None if
    another won (then the caller rolls back)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != Status.QUEUED:
        return None
    attempt = job.attempt + 1
    now = utcnow()
    values = dict(
        status=Status.RUNNING, attempt=attempt, worker=worker, heartbeat_at=now, started_at=job.started_at or now, phase=None,
    )
    if not _set_if(session, job_id, Status.QUEUED, values, *_attempt_is(job.attempt)):
        return None
    # The worker's name (host and process) stays in the job row and the logs: events are the tenant's.
    add_event(session, job, "started", {"attempt": attempt})
    return attempt


def claim(session: Session, job_id: str, worker: str) -> int | None:
    """``start``, committed (or rolled back if another won)."""
    attempt = start(session, job_id, worker)
    if attempt is None:
        session.rollback()
    else:
        session.commit()
    return attempt


@dataclass(frozen=True)
class RunState:
    owned: bool  # the job is still running under the attempt asked about
    cancel_requested: bool


def run_state(session: Session, job_id: str, attempt: int) -> RunState:
    """Whether the worker holding ``attempt`` still runs the job, and whether it should stop."""
    row = session.execute(select(Job.status, Job.attempt, Job.cancel_requested).where(Job.id == job_id)).one()
    return RunState(owned=row.status == Status.RUNNING and row.attempt == attempt, cancel_requested=row.cancel_requested)


def touch_running(session: Session, job: Job, attempt: int, event: tuple[str, dict[str, Any]] | None = None, **values: Any) -> bool:
    """A sign of life from the worker holding ``attempt``: the heartbeat, ``values`` (progress)
    and ``event`` (kind, data) are recorded only while that attempt runs the job; committed.
    False once the job moved on without this worker (it was presumed lost, or the job ended)."""
    owned = _set_if(session, job.id, Status.RUNNING, {"heartbeat_at": utcnow(), **values}, *_attempt_is(attempt))
    if owned and event is not None:
        add_event(session, job, *event)
    session.commit()
    return owned


def finish(session: Session, job: Job, attempt: int, new: Status, data: dict[str, Any], **values: Any) -> bool:
    """running -> ``new`` (an end) for the worker holding ``attempt``, with its "finished"
    event carrying ``data``; committed. False (all rolled back) if the job is no longer its,
    or if it was to succeed but was asked to cancel."""
    return _move(session, job, Status.RUNNING, new, "finished", data, attempt=attempt, **values)


def cancel(session: Session, job: Job) -> Status:
    """Cancel a queued job at once, or ask a running one to stop; the status it then has.

    Raises ``InvalidTransition`` for a job that already ended. The status may change between
    reading and writing (a worker claims the job, or loses it), so the loop retries with the
    status found; each turn changes nothing unless its compare-and-set wins.
    """
    for _ in range(5):
        session.refresh(job)
        if job.status == Status.QUEUED:
            if _move(session, job, Status.QUEUED, Status.CANCELLED, "finished", {}, cancel_requested=True):
                return Status.CANCELLED
        elif job.status == Status.RUNNING:
            if _set_if(session, job.id, Status.RUNNING, {"cancel_requested": True}):
                add_event(session, job, "cancel_requested", {})
                session.commit()
                return Status.RUNNING
            session.rollback()
        else:
            raise InvalidTransition(job.id, job.status, Status.CANCELLED)
    raise InvalidTransition(job.id, job.status, Status.CANCELLED)


def lost_jobs(session: Session, queues: list[str], silent_since: datetime) -> list[Job]:
    """Running jobs of ``queues`` whose worker has not beaten since ``silent_since`` (or never did)."""
    silent = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < silent_since)
    return list(session.scalars(select(Job).where(Job.status == Status.RUNNING, Job.queue.in_(queues), silent)))


def requeue(session: Session, job: Job, attempt: int, reason: str, **values: Any) -> Status | None:
    """A running job goes back to the queue, its next attempt to resume from the last
    checkpoint: its worker is gone or stopping. A job asked to cancel ends cancelled instead.

    Only while ``attempt`` holds the job; returns the new status, or None if the job changed
    meanwhile. Committed.
    """
    if _move(
        session, job, Status.RUNNING, Status.QUEUED, "requeued", {"reason": reason},
        attempt=attempt, enqueued_at=utcnow(), worker=None, **values,
    ):
        return Status.QUEUED
    # Lost: the job changed meanwhile, or a cancel was asked for, which the move refuses (in
    # the same statement, so a cancel that lands between two checks cannot be requeued).
    moved = _move(session, job, Status.RUNNING, Status.CANCELLED, "finished", {"reason": reason}, attempt=attempt)
    return Status.CANCELLED if moved else None


def worker_lost(session: Session, job: Job, reason: str, max_attempts: int) -> Status | None:
    """The worker running ``job`` (as read, with its attempt) is gone: the job is queued again,
    or fails once its workers were lost ``max_attempts`` times, since a job that kills its
    worker (out of memory, say) would otherwise take worker after worker for ever. A job
    asked to cancel ends cancelled. The new status, or None if the job changed meanwhile."""
    lost = job.workers_lost + 1
    if lost < max_attempts or job.cancel_requested:
        return requeue(session, job, job.attempt, reason, workers_lost=lost)
    message = f"the worker was lost {lost} times ({reason}); the job may be what stops it, as running out of memory would"
    error = {"code": "worker_lost", "message": message}
    failed = _move(
        session, job, Status.RUNNING, Status.FAILED, "finished", {"error": error},
        attempt=job.attempt, workers_lost=lost, error_code=error["code"], error_message=message,
    )
    return Status.FAILED if failed else None


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
