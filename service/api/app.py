"""The FastAPI application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.jobs.queue import create_celery
from service.jobs.reconciler import start_reconciler

from service.api.body_limit import BodyLimitMiddleware
from service.db import Database
from service.api.errors import install_error_handlers
from service.api.inference import close_engine
from service.migrate import upgrade_database
from service.api.routes import adapters, files, generate, health, jobs, models
from service.api.schemas import error_responses
from service.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.prepare_dirs()
        upgrade_database(settings.database)
        reconciler = start_reconciler(settings, app.state.db, app.state.celery)  # tokens owed are sent even with no worker up
        yield
        await asyncio.to_thread(reconciler.stop)
        await asyncio.to_thread(close_engine, app)  # the inference engine, if a request made one
        app.state.db.dispose()

    app = FastAPI(title="rlora", summary="Multi-tenant R-LoRA fine-tuning", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.db = Database(settings.database)
    app.state.celery = create_celery(settings)
    install_error_handlers(app)
    # File uploads stream under their own limit (max_upload_bytes); every other body, this one.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_json_bytes, exempt=[("POST", "/v1/files")])
    for module, statuses in (
        (health, (503,)),
        (files, (401, 404, 409, 413, 422, 503)),
        (jobs, (401, 404, 409, 413, 415, 422, 429, 503)),
        (adapters, (401, 404, 410, 422, 503)),
        (models, (401, 503)),
        (generate, (401, 404, 410, 413, 415, 422, 429, 503)),
    ):
        # The error statuses each route may answer with, in the one shape (not FastAPI's).
        app.include_router(module.router, responses=error_responses(*statuses))
    return app
