from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from sqlalchemy import Connection, Row, select
from starlette.concurrency import run_in_threadpool

from service.api import plots
from service.api.auth import AuthenticatedTenant, TenantDep, TenantReader, TenantReaderDep
from service.api.deps import CeleryDep, SessionDep, SessionRoute, SettingsDep
from service.api.errors import APIError, reject_lone_surrogates
from service.api.event_stream import job_event_stream
from service.api.job_store import IDEMPOTENCY_HEADER, JOB_ROWS, cancel_owned_job, read_job_row, submit_job
from service.api.paging import EventPageDep, PageDep, page
from service.api.schemas import JobCreate, JobError, JobEventOut, JobMetrics, JobOut, Page, Progress
from service.jobs.requests import request_hash
from service.jobs.states import Status
from service.models import Adapter, Job, JobEvent

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
        training=job.training, cancel_requested=job.cancel_requested, attempt=job.attempt, phase=job.phase, progress=progress,
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


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "one event per job event; ends when the job has ended"}},
)
async def stream_events(
    job_id: str,
    read_as_tenant: TenantReaderDep,
    after: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="id of the last event seen")] = None,
    last_event_id: Annotated[
        int | None, Header(alias="Last-Event-ID", ge=0, le=2**31 - 1, description="as after; sent by a reconnecting EventSource")
    ] = None,
) -> StreamingResponse:
    """The job's events as server-sent events (``id``, ``event``: the kind, ``data``: the event
    as ``/events`` gives it), from the first (or after ``after`` / ``Last-Event-ID``) until the
    job has ended and its last event was sent."""

    def check(connection: Connection, tenant: AuthenticatedTenant) -> None:
        read_job_row(connection, tenant.id, job_id)  # 404 before the stream starts

    await read_as_tenant(check)
    start = max(after or 0, last_event_id or 0)
    return StreamingResponse(job_event_stream(read_as_tenant, job_id, start), media_type="text/event-stream")


def read_job_metrics(connection: Connection, tenant_id: str, job_id: str) -> JobMetrics:
    """The tenant's job's loss curve and final metrics (the curve so far while it runs)."""
    job = read_job_row(connection, tenant_id, job_id)
    if job.metrics is not None:
        return JobMetrics(job_id=job.id, status=job.status, final=True, train_loss=job.metrics.get("train_loss", []), metrics=job.metrics)
    # Until the job has its final metrics, the curve is what progress events recorded.
    events = connection.execute(
        select(JobEvent.data)
        .where(JobEvent.tenant_id == tenant_id, JobEvent.job_id == job.id, JobEvent.kind == "progress")
        .order_by(JobEvent.id)
    )
    curve = [{"step": data["step"], "loss": data["loss"]} for (data,) in events if data.get("loss") is not None]
    return JobMetrics(job_id=job.id, status=job.status, final=False, train_loss=curve, metrics=None)


@router.get("/{job_id}/metrics")
async def job_metrics(job_id: str, read_as_tenant: TenantReaderDep) -> JobMetrics:
    return await read_as_tenant(lambda connection, tenant: read_job_metrics(connection, tenant.id, job_id))


def _picture_data(job_id: str, plot: str):
    """The read of what picture ``plot`` of the job draws (a 404 for another tenant's job)."""

    def read(connection: Connection, tenant: AuthenticatedTenant) -> Any:
        if plot == "head_similarity":
            row = read_job_row(connection, tenant.id, job_id)
            path = connection.execute(select(Adapter.path).where(Adapter.tenant_id == tenant.id, Adapter.job_id == row.id)).scalar()
            if path is None:
                raise plots.PlotUnavailable("the job has no adapter (yet)")
            return Path(path)
        return read_job_metrics(connection, tenant.id, job_id)

    return read


def _draw(plot: str, data: Any, fmt: str) -> bytes:
    if plot == "loss":
        return plots.loss_plot(data.train_loss, (data.metrics or {}).get("eval"), fmt)
    if plot == "routing":
        return plots.routing_plot(plots.routing_by_task(data.metrics), fmt)
    return plots.head_similarity_plot(plots.head_similarity_matrices(data), fmt)


async def job_picture(read_as_tenant: TenantReader, job_id: str, picture: str) -> Response:
    """Picture ``picture`` (``<plot>.<png|svg>``) of the tenant's job, drawn in a thread after
    its data was read; a 404 names the pictures, or says why this one cannot be drawn yet."""
    plot, _, fmt = picture.rpartition(".")
    if plot not in plots.PLOTS or fmt not in plots.FORMATS:
        names = ", ".join(f"{p}.{f}" for p in plots.PLOTS for f in plots.FORMATS)
        raise APIError(404, "not_found", f"no picture {picture!r}; the pictures are {names}")
    try:
        data = await read_as_tenant(_picture_data(job_id, plot))
        image = await run_in_threadpool(_draw, plot, data, fmt)
    except plots.PlotUnavailable as err:
        raise APIError(404, "not_available", f"{plot} of job {job_id}: {err}") from None
    return Response(image, media_type=plots.FORMATS[fmt])


@router.get(
    "/{job_id}/plots/{picture}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}, "description": "the picture"}},
)
async def job_plot(
    job_id: str,
    read_as_tenant: TenantReaderDep,
    picture: Annotated[str, PathParam(description="loss, head_similarity or routing, then .png or .svg")],
) -> Response:
    """A picture of the job: ``loss`` (training loss by step, each task's eval loss), ``head_similarity``
    (per adapted layer, the cosine similarity of each pair of heads; once the job has its adapter)
    or ``routing`` (each task's mean head weights; once the job has finished)."""
    return await job_picture(read_as_tenant, job_id, picture)
