"""OpenAI's fine-tuning API over the service's jobs: one job model, two views. A job made here
is a job of ``/v1/jobs`` too (and the other way round); its ``fine_tuned_model`` is its
adapter's id, which the inference routes take as ``model``.

``POST /v1/fine_tuning/jobs``                    training_file, model, hyperparameters or
                                                 method, suffix, seed, metadata; rlora (beyond
                                                 OpenAI): the adapter and training settings
``GET  /v1/fine_tuning/jobs``                    newest first, ``after`` (a job id) and ``limit``
``GET  /v1/fine_tuning/jobs/{id}``
``POST /v1/fine_tuning/jobs/{id}/cancel``
``GET  /v1/fine_tuning/jobs/{id}/events``        newest first, ``after`` (an event id) and ``limit``
``GET  /v1/fine_tuning/jobs/{id}/checkpoints``   the adapter, once the job succeeded

Errors are in OpenAI's shape, an invalid request a 400 (``OpenAIRoute``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from pydantic import ValidationError
from sqlalchemy import Connection, select

from service.api.auth import AuthenticatedTenant, TenantDep, TenantReaderDep
from service.api.deps import CeleryDep, SessionDep, SettingsDep
from service.api.errors import invalid_fields, reject_lone_surrogates
from service.api.job_store import IDEMPOTENCY_HEADER, JOB_ROWS, cancel_owned_job, read_job_row, submit_job
from service.api.openai_schemas import (
    CheckpointMetrics,
    CursorPage,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCreate,
    FineTuningJobEvent,
    OpenAIRoute,
    event_cursor,
    fine_tuning_event,
    fine_tuning_job,
)
from service.api.paging import PageDep, PageParams, checked_limit, page
from service.api.schemas import unix_seconds
from service.jobs.requests import JobRequest, request_hash
from service.models import Adapter, Job, JobEvent
from service.problems import validation_problems

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning (OpenAI)"], route_class=OpenAIRoute)


def _job_request(body: FineTuningJobCreate) -> tuple[JobRequest, dict[str, str]]:
    values, set_by = body.job_request()
    try:
        return JobRequest.model_validate(values), set_by
    except ValidationError as err:
        rename = FineTuningJobCreate.field_name(set_by)
        raise invalid_fields([{**p, "field": rename(p["field"])} if p.get("field") else p for p in validation_problems(err.errors())]) from None


@router.post("")
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER, min_length=1, max_length=255)] = None,
) -> FineTuningJob:
    """A job on one training file (``rlora`` gives the adapter and the other training settings)."""
    reject_lone_surrogates(body.model_dump())
    request, set_by = _job_request(body)
    submitted = submit_job(
        session, settings, celery, tenant.id, request, digest=request_hash(body), idempotency_key=idempotency_key,
        columns={"suffix": body.suffix, "user_metadata": body.metadata}, field_name=FineTuningJobCreate.field_name(set_by),
    )
    return fine_tuning_job(submitted.job, submitted.adapter_id)


@router.get("")
async def list_fine_tuning_jobs(read_as_tenant: TenantReaderDep, params: PageDep) -> CursorPage[FineTuningJob]:
    def read(connection: Connection, tenant: AuthenticatedTenant) -> CursorPage[FineTuningJob]:
        rows, cursor = page(connection, JOB_ROWS.where(Job.tenant_id == tenant.id), Job.id, params)
        return CursorPage[FineTuningJob](data=[fine_tuning_job(row, row.adapter_id) for row in rows], has_more=cursor is not None)

    return await read_as_tenant(read)


@router.get("/{job_id}")
async def retrieve_fine_tuning_job(job_id: str, read_as_tenant: TenantReaderDep) -> FineTuningJob:
    def read(connection: Connection, tenant: AuthenticatedTenant) -> FineTuningJob:
        row = read_job_row(connection, tenant.id, job_id)
        return fine_tuning_job(row, row.adapter_id)

    return await read_as_tenant(read)


@router.post("/{job_id}/cancel")
def cancel_fine_tuning_job(job_id: str, tenant: TenantDep, session: SessionDep) -> FineTuningJob:
    """A queued job is cancelled at once; a running one stops at its next step (``status``
    stays ``running`` until then)."""
    row = cancel_owned_job(session, tenant.id, job_id)
    return fine_tuning_job(row, row.adapter_id)


@router.get("/{job_id}/events")
async def list_fine_tuning_events(
    job_id: str,
    read_as_tenant: TenantReaderDep,
    settings: SettingsDep,
    after: Annotated[str | None, Query(max_length=100, description="the id of the last event seen: older ones follow")] = None,
    limit: Annotated[int, Query(ge=1, description="events per page")] = 20,
) -> CursorPage[FineTuningJobEvent]:
    """Newest first, as OpenAI lists them (``GET /v1/jobs/{id}/events`` gives them oldest first)."""
    # Newest first is PageParams' order; its cursor compares with the event's integer id.
    params = PageParams(limit=checked_limit(settings, limit), after=event_cursor(after))  # type: ignore[arg-type]

    def read(connection: Connection, tenant: AuthenticatedTenant) -> CursorPage[FineTuningJobEvent]:
        read_job_row(connection, tenant.id, job_id)
        query = select(JobEvent.__table__).where(JobEvent.tenant_id == tenant.id, JobEvent.job_id == job_id)
        rows, cursor = page(connection, query, JobEvent.id, params)
        return CursorPage[FineTuningJobEvent](data=[fine_tuning_event(row) for row in rows], has_more=cursor is not None)

    return await read_as_tenant(read)


def _checkpoint(adapter, job) -> FineTuningJobCheckpoint:
    metrics = adapter.metrics or {}
    losses = metrics.get("train_loss") or []
    last = losses[-1] if losses else {}
    step = metrics.get("steps") if metrics.get("steps") is not None else job.step
    return FineTuningJobCheckpoint(
        id=f"ftckpt-{adapter.id}", created_at=unix_seconds(adapter.created_at), fine_tuned_model_checkpoint=adapter.id,
        fine_tuning_job_id=job.id, metrics=CheckpointMetrics(step=step, train_loss=last.get("loss")), step_number=step or 0,
    )


@router.get("/{job_id}/checkpoints")
async def list_fine_tuning_checkpoints(
    job_id: str,
    read_as_tenant: TenantReaderDep,
    after: Annotated[str | None, Query(max_length=100, description="the id of the last checkpoint seen")] = None,
    limit: Annotated[int, Query(ge=1)] = 10,
) -> CursorPage[FineTuningJobCheckpoint]:
    """The model the job made, its adapter, once it succeeded (the trainer's intermediate
    checkpoints are for resuming, not for serving, so a job has at most this one, and any
    ``limit`` holds it)."""

    def read(connection: Connection, tenant: AuthenticatedTenant) -> CursorPage[FineTuningJobCheckpoint]:
        job = read_job_row(connection, tenant.id, job_id)
        if job.adapter_id is None or after is not None:  # the one checkpoint is the first page
            return CursorPage[FineTuningJobCheckpoint](data=[], has_more=False)
        adapter = connection.execute(select(Adapter.__table__).where(Adapter.id == job.adapter_id)).one()
        return CursorPage[FineTuningJobCheckpoint](data=[_checkpoint(adapter, job)], has_more=False)

    return await read_as_tenant(read)
