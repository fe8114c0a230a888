from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import Connection, Row, select

from service.api.auth import AuthenticatedTenant, TenantDep, TenantReaderDep
from service.api.deps import CeleryDep, SessionDep, SessionRoute, SettingsDep
from service.api.errors import reject_lone_surrogates
from service.api.job_store import IDEMPOTENCY_HEADER, JOB_ROWS, cancel_owned_job, read_job_row, submit_job
from service.api.paging import EventPageDep, PageDep, page
from service.api.schemas import JobCreate, JobError, JobEventOut, JobMetrics, JobOut, Page, Progress
from service.jobs.requests import request_hash
from service.jobs.states import Status
from service.models import Job, JobEvent

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=SessionRoute)


def job_out(job: Job | Row, adapter_id: str | None) -> JobOut:
    progress = None
    if job.step is not None:
        progress = Progress(
            step=job.step, total_steps=job.total_steps, loss=job.loss, learning_rate=job.learning_rate,
            tokens_per_second=job.tokens_per_second, eta_seconds=job.eta_seconds,
        )
    error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobOut(
        id=job.id, status=job.status, base_model=job.base_model, mixture=job.mixture, adapter=job.adapter,
        training=job.training, cancel_requested=job.cancel_requested, attempt=job.attempt, progress=progress,
        metrics=job.metrics, adapter_id=adapter_id, error=error, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at,
    )


@router.post("", status_code=201)
def create_job(
    body: JobCreate,
    response: Response,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER, min_length=1, max_length=255)] = None,
) -> JobOut:
    reject_lone_surrogates(body.model_dump())
    submitted = submit_job(session, settings, celery, tenant.id, body, digest=request_hash(body), idempotency_key=idempotency_key)
    if not submitted.created:
        response.status_code = 200
    return job_out(submitted.job, submitted.adapter_id)


@router.get("")
async def list_jobs(
    read_as_tenant: TenantReaderDep,
    params: PageDep,
    status: Annotated[Status | None, Query(description="only jobs in this status")] = None,
) -> Page[JobOut]:
    def read(connection: Connection, tenant: AuthenticatedTenant) -> Page[JobOut]:
        query = JOB_ROWS.where(Job.tenant_id == tenant.id)
        if status is not None:
            query = query.where(Job.status == status)
        rows, cursor = page(connection, query, Job.id, params)
        return Page(data=[job_out(row, row.adapter_id) for row in rows], next_cursor=cursor)

    return await read_as_tenant(read)


@router.get("/{job_id}")
async def read_job(job_id: str, read_as_tenant: TenantReaderDep) -> JobOut:
    def read(connection: Connection, tenant: AuthenticatedTenant) -> JobOut:
        row = read_job_row(connection, tenant.id, job_id)
        return job_out(row, row.adapter_id)

    return await read_as_tenant(read)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, tenant: TenantDep, session: SessionDep) -> JobOut:
    row = cancel_owned_job(session, tenant.id, job_id)
    return job_out(row, row.adapter_id)


@router.get("/{job_id}/events")
async def list_events(job_id: str, read_as_tenant: TenantReaderDep, params: EventPageDep) -> Page[JobEventOut]:
    def read(connection: Connection, tenant: AuthenticatedTenant) -> Page[JobEventOut]:
        read_job_row(connection, tenant.id, job_id)
        query = select(JobEvent.__table__).where(JobEvent.tenant_id == tenant.id, JobEvent.job_id == job_id)
        rows, cursor = page(connection, query, JobEvent.id, params)
        return Page(data=[JobEventOut.model_validate(row) for row in rows], next_cursor=cursor)

    return await read_as_tenant(read)


@router.get("/{job_id}/metrics")
async def job_metrics(job_id: str, read_as_tenant: TenantReaderDep) -> JobMetrics:
    def read(connection: Connection, tenant: AuthenticatedTenant) -> JobMetrics:
        job = read_job_row(connection, tenant.id, job_id)
        if job.metrics is not None:
            return JobMetrics(job_id=job.id, status=job.status, final=True, train_loss=job.metrics.get("train_loss", []), metrics=job.metrics)
        # Until the job has its final metrics, the curve is what progress events recorded.
        events = connection.execute(
            select(JobEvent.data)
            .where(JobEvent.tenant_id == tenant.id, JobEvent.job_id == job.id, JobEvent.kind == "progress")
            .order_by(JobEvent.id)
        )
        curve = [{"step": data["step"], "loss": data["loss"]} for (data,) in events if data.get("loss") is not None]
        return JobMetrics(job_id=job.id, status=job.status, final=False, train_loss=curve, metrics=None)

    return await read_as_tenant(read)
