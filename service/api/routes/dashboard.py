"""The dashboard: server-rendered pages (Jinja2, no script, no build step) of a tenant's jobs,
each job with its pictures, events and eval table. ``GET /`` leads here.

Signing in: the page asks for an API key and keeps it in a cookie that only these pages read.
The cookie is ``HttpOnly`` (no script can read it, so a script injected into a page could
not steal the key), ``SameSite=Strict`` (no other site's page or link sends it), ``Secure``
when served over HTTPS, scoped to ``/ui``, and lives for the browser session. The API itself
never reads it: ``/v1`` takes bearer keys only, so a cookie cannot make another site's form
change anything there; the dashboard's only writes are signing in and out, and those refuse
a request whose ``Origin`` is another site's. The key is looked up on every page, as on
every API request: a revoked key signs the browser out at its next page. Pages are sent with
a Content-Security-Policy that allows nothing but this origin's styles and images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import Connection, select

from service.api import plots
from service.api.auth import AuthenticatedTenant, TenantReader
from service.api.errors import APIError
from service.api.routes.jobs import JOB_ROWS, job_out, job_picture, read_job_metrics, read_job_row
from service.api.schemas import JobEventOut
from service.ids import could_exist, hash_api_key
from service.jobs.states import ACTIVE
from service.models import Job, JobEvent

PREFIX = "/ui"
COOKIE = "rlora_key"
JOBS_SHOWN = 100
EVENTS_SHOWN = 200  # the latest; GET /v1/jobs/{id}/events pages through them all
REFRESH_SECONDS = 5  # pages of active jobs reload themselves
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

_HERE = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=_HERE / "templates")  # autoescapes .html
static_files = StaticFiles(directory=_HERE / "static")

router = APIRouter(include_in_schema=False)


def _page(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


def _reader(request: Request) -> TenantReader | None:
    key = request.cookies.get(COOKIE)
    return TenantReader(request.app.state.db, hash_api_key(key)) if key else None


async def _read(request: Request, read):
    """``read(connection, tenant)`` with the cookie's key; None when it is missing or no
    longer valid (expired, revoked), so the page asks for a key again."""
    reader = _reader(request)
    if reader is None:
        return None
    try:
        return await reader(read)
    except APIError as err:
        if err.status == 401:
            return None
        raise


def _sign_in(request: Request, message: str | None = None, status_code: int = 200) -> HTMLResponse:
    response = _page(request, "login.html", status_code, message=message)
    if request.cookies.get(COOKIE):
        response.delete_cookie(COOKIE, path=PREFIX)
    return response


def _same_origin(request: Request) -> None:
    """Sign-in and sign-out are form posts: refuse one made by another site's page."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise APIError(403, "forbidden", "this form only accepts posts from the dashboard's own pages")


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/", status_code=307)


@router.get(f"{PREFIX}/")
async def jobs_page(request: Request, after: str | None = None) -> HTMLResponse:
    def read(connection: Connection, tenant: AuthenticatedTenant):
        query = JOB_ROWS.where(Job.tenant_id == tenant.id)
        if after and could_exist(after):  # a NUL would be PostgreSQL's error, not the user's
            query = query.where(Job.id < after)
        rows = connection.execute(query.order_by(Job.id.desc()).limit(JOBS_SHOWN + 1)).all()
        jobs = [job_out(row, row.adapter_id) for row in rows[:JOBS_SHOWN]]
        return tenant, jobs, (jobs[-1].id if len(rows) > JOBS_SHOWN else None)

    found = await _read(request, read)
    if found is None:
        return _sign_in(request)
    tenant, jobs, older = found
    refresh = REFRESH_SECONDS if any(job.status in ACTIVE for job in jobs) else None
    return _page(request, "jobs.html", tenant=tenant, jobs=jobs, older=older, refresh=refresh)


@router.get(PREFIX + "/jobs/{job_id}")
async def job_page(request: Request, job_id: str) -> HTMLResponse:
    def read(connection: Connection, tenant: AuthenticatedTenant):
        row = read_job_row(connection, tenant.id, job_id)
        events = connection.execute(
            select(JobEvent.__table__)
            .where(JobEvent.tenant_id == tenant.id, JobEvent.job_id == job_id)
            .order_by(JobEvent.id.desc())
            .limit(EVENTS_SHOWN)
        )
        metrics = read_job_metrics(connection, tenant.id, job_id)
        return tenant, job_out(row, row.adapter_id), [JobEventOut.model_validate(e) for e in events][::-1], metrics

    try:
        found = await _read(request, read)
    except APIError as err:
        if err.status != 404:
            raise
        return _page(request, "missing.html", 404, job_id=job_id)
    if found is None:
        return _sign_in(request)
    tenant, job, events, metrics = found
    final = metrics.metrics or {}
    # Only the pictures there is data for: no broken images while a job waits.
    pictures = (["loss"] if metrics.train_loss else []) + (["head_similarity"] if job.adapter_id else []) + (
        ["routing"] if plots.routing_by_task(final) else []
    )
    return _page(
        request, "job.html", tenant=tenant, job=job, events=events, pictures=pictures, evaluation=final.get("eval") or {},
        head_similarity=final.get("head_similarity"), refresh=REFRESH_SECONDS if job.status in ACTIVE else None,
    )


@router.get(PREFIX + "/jobs/{job_id}/plots/{picture}")
async def job_picture_page(request: Request, job_id: str, picture: str) -> Response:
    reader = _reader(request)
    if reader is None:
        raise APIError(401, "unauthorized", "sign in on the dashboard first")
    return await job_picture(reader, job_id, picture)


@router.post(f"{PREFIX}/login")
async def sign_in(request: Request, key: Annotated[str, Form(max_length=200)]) -> Response:
    _same_origin(request)
    key = key.strip()
    try:
        await TenantReader(request.app.state.db, hash_api_key(key))(lambda connection, tenant: tenant)
    except APIError as err:
        if err.status != 401:
            raise
        return _sign_in(request, f"That key does not work: {err.message}.", 401)
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    response.set_cookie(
        COOKIE, key, path=PREFIX, httponly=True, samesite="strict", secure=request.url.scheme == "https",
    )
    return response


@router.post(f"{PREFIX}/logout")
async def sign_out(request: Request) -> RedirectResponse:
    _same_origin(request)
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX)
    return response
