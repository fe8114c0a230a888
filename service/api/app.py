"""The FastAPI application."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from starlette.types import ASGIApp

from service.api.body_limit import BodyLimitMiddleware
from service.api.docs import install_docs
from service.api.errors import install_error_handlers
from service.api.inference import close_engine
from service.api.openapi import install_openapi
from service.api.openai_schemas import error_responses as openai_error_responses
from service.api.tgi import error_responses as tgi_error_responses
from service.api.routes import adapters, admin, dashboard, files, generate, health, jobs, keys, metrics, models, openai_inference, openai_jobs, usage
from service.api.schemas import error_responses
from service.api.security_headers import SecurityHeadersMiddleware
from service.api.telemetry import TelemetryMiddleware
from service.api.staging import sweep_staging
from service.db import Database
from service.jobs.queue import create_celery
from service.jobs.reconciler import start_reconciler
from service.logs import configure_logging
from service.migrate import upgrade_database
from service.settings import Settings, get_settings


class ServiceAPI(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        # Outside every other layer, Starlette's ServerErrorMiddleware included (it answers a
        # 500 itself, past any middleware added with add_middleware): every answer is covered,
        # and counted and logged with its request id.
        return TelemetryMiddleware(SecurityHeadersMiddleware(super().build_middleware_stack()))


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    """The API; ``migrate=False`` where the database was brought to head before the process
    started (``rlora serve`` does so once for all its processes)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync endpoints and database work run on anyio's default threads; the pool has a
        # connection for each (Database below), so a thread never waits on another for one.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        settings.prepare_dirs()
        if migrate:
            upgrade_database(settings.database)
        await asyncio.to_thread(sweep_staging, settings)
        reconciler = start_reconciler(settings, app.state.db, app.state.celery)  # tokens owed are sent even with no worker up
        # What is loaded by now (torch, transformers, the app: millions of objects) lives as
        # long as the process: out of the collector's sight, or every full collection walks it
        # all, a pause of a hundred milliseconds or more in the middle of requests.
        gc.collect()
        gc.freeze()
        yield
        await asyncio.to_thread(reconciler.stop)
        await close_engine(app)  # the inference engine, if a request made one
        app.state.db.dispose()

    app = ServiceAPI(
        title="rlora", summary="Multi-tenant R-LoRA fine-tuning", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    install_docs(app)  # /docs and /redoc from installed files, not a CDN
    app.state.settings = settings
    app.state.db = Database(settings.database, pool_size=settings.api_threads, pool_timeout=settings.database_pool_timeout)
    app.state.celery = create_celery(settings)
    install_error_handlers(app)
    metrics.install_metrics(app)
    # File uploads stream under their own limit (max_upload_bytes); every other body, this one.
    app.add_middleware(
        BodyLimitMiddleware, limit=settings.max_json_bytes, idle_timeout=settings.body_idle_timeout,
        min_rate=settings.body_min_rate, exempt=[("POST", "/v1/files")],
    )
    for module, statuses in (
        (health, ()),
        (metrics, ()),
        (files, (401, 403, 404, 408, 409, 413, 422, 503)),
        (jobs, (401, 403, 404, 408, 409, 413, 415, 422, 429, 503)),
        (adapters, (401, 404, 410, 422, 503)),
        (models, (401, 404, 503)),
        (keys, (401, 404, 422, 503)),
        (usage, (401, 503)),
    ):
        # The error statuses each route may answer with, in the one shape (not FastAPI's).
        app.include_router(module.router, responses=error_responses(*statuses))
    # The routes of other APIs, their errors in those APIs' shapes.
    app.include_router(generate.router, responses=tgi_error_responses(401, 404, 408, 410, 413, 415, 422, 429, 503))
    for module in (openai_jobs, openai_inference):
        app.include_router(module.router, responses=openai_error_responses(400, 401, 403, 404, 408, 409, 410, 413, 415, 429, 503))
    app.include_router(dashboard.router)
    app.mount(f"{dashboard.PREFIX}/static", dashboard.static_files, name="dashboard-static")
    if settings.admin_token:
        app.include_router(admin.router, responses=error_responses(401, 404, 408, 409, 413, 415, 422, 503))
    install_openapi(app, settings)
    return app


def create_served_app() -> FastAPI:
    """The app of each ``rlora serve`` process (uvicorn's factory): settings from the
    environment, the database migrated already by the command."""
    settings = get_settings()
    # uvicorn's worker processes start afresh: they log as the command does (its --log-level
    # reaches them as RLORA_LOG_LEVEL).
    configure_logging(settings.log_level or "info", settings.log_format)
    return create_app(settings, migrate=False)
