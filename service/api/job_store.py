"""Jobs as the job views submit, read and cancel them: shared by the native job routes
(``routes/jobs.py``) and OpenAI's fine-tuning view of the same jobs (``routes/openai_jobs.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import Connection, Row, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.api.auth import get_owned, read_owned, where_owned
from service.api.errors import APIError, invalid_fields
from service.jobs import quotas, scheduling, states
from service.jobs.queue import send_token
from service.jobs.requests import InvalidJobRequest, JobRequest, check_job
from service.models import Adapter, Job, JobFile
from service.settings import Settings

IDEMPOTENCY_HEADER = "Idempotency-Key"

# A job's columns and its adapter's id (None until it succeeds): what the job views show.
JOB_ROWS = select(Job.__table__, Adapter.__table__.c.id.label("adapter_id")).outerjoin(
    Adapter.__table__, Adapter.__table__.c.job_id == Job.__table__.c.id
)
_OWNED_JOB_ROWS = where_owned(JOB_ROWS, Job.__table__)


def read_job_row(connection: Connection | Session, tenant_id: str, job_id: str) -> Row:
    """The tenant's job as a row of ``JOB_ROWS`` (404 when it has none of that id)."""
    return read_owned(connection, _OWNED_JOB_ROWS, tenant_id, job_id, "job")


@dataclass(frozen=True)
class Submitted:
    job: Job | Row  # the job's columns
    adapter_id: str | None
    created: bool  # False: an earlier submission with the same idempotency key, answered again


def _replay(session: Session, tenant_id: str, key: str, digest: str) -> Job | None:
    """The job an earlier submission with this key created, if it was the same request."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is not None and job.request_hash != digest:
        raise APIError(
            422, "idempotency_key_reused", f"{IDEMPOTENCY_HEADER} {key!r} was used for a different request (job {job.id})",
            field=IDEMPOTENCY_HEADER,
        )
    return job


def submit_job(
    session: Session,
    settings: Settings,
    celery: Celery,
    tenant_id: str,
    request: JobRequest,
    *,
    digest: str,
    idempotency_key: str | None = None,
    columns: dict[str, Any] | None = None,
    field_name: Callable[[str], str] = str,
) -> Submitted:
    """Queue ``request`` (every problem: one 422, each field as ``field_name`` names it to the
    caller), with ``columns`` set on the new job; or the job an earlier submission with the same
    ``idempotency_key`` and ``digest`` made."""
    if idempotency_key is not None:
        earlier = _replay(session, tenant_id, idempotency_key, digest)
        if earlier is not None:
            row = read_job_row(session, tenant_id, earlier.id)
            return Submitted(row, row.adapter_id, created=False)

    try:
        checked = check_job(session, settings, tenant_id, request)
    except InvalidJobRequest as err:
        raise invalid_fields([{**p, "field": field_name(p["field"])} if p.get("field") else p for p in err.problems]) from None
    # Counted and inserted under the tenant's lock: concurrent submissions cannot all see
    # room for one more.
    scheduling.lock_tenant(session, tenant_id)
    active = scheduling.active_jobs(session, tenant_id)
    if active >= settings.max_active_jobs_per_tenant:
        session.rollback()
        raise APIError(429, "too_many_jobs", f"{active} jobs are queued or running; the limit is {settings.max_active_jobs_per_tenant}")
    quotas.check_job_submission(session, settings, tenant_id)  # the lock goes with the session on a refusal

    job = checked.job
    job.idempotency_key = idempotency_key
    job.request_hash = digest
    for name, value in (columns or {}).items():
        setattr(job, name, value)
    session.add(job)
    try:
        session.flush()
        session.add_all(JobFile(job_id=job.id, file_id=file_id, tenant_id=tenant_id) for file_id in checked.file_ids)
        states.add_event(session, job, "created", {"queue": job.queue})
        session.commit()
    except IntegrityError:
        # Either a concurrent submission with the same key won the insert (answer with its
        # job), or a file of the mixture was deleted meanwhile.
        session.rollback()
        earlier = _replay(session, tenant_id, idempotency_key, digest) if idempotency_key else None
        if earlier is None:
            raise APIError(409, "conflict", "a file of the mixture was deleted during submission; check the files and submit again") from None
        return Submitted(earlier, None, created=False)
    send_token(celery, job.queue)
    return Submitted(job, None, created=True)


def cancel_owned_job(session: Session, tenant_id: str, job_id: str) -> Row:
    """Cancel the tenant's job (a queued one at once, a running one at its next step); the job
    as a row of ``JOB_ROWS``. 409 for a job that ended."""
    job = get_owned(session, Job, tenant_id, job_id, "job")
    try:
        states.cancel(session, job)
    except states.InvalidTransition as err:
        raise APIError(409, "invalid_transition", str(err)) from None
    return read_job_row(session, tenant_id, job_id)
