"""Liveness (``/health``: the process answers) and readiness (``/ready``: it can serve, its
database and broker answer). A load balancer routes by /ready; a supervisor restarts by /health,
which stays up through a database or broker outage (a restart would not fix those)."""

from __future__ import annotations

import os
from collections.abc import Callable

import anyio
from celery import Celery
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.errors import RETRY_AFTER, error_body
from service.api.schemas import Health, Ready, error_responses
from service.db import Database
from service.jobs.queue import EMBEDDED_BROKER_URL

router = APIRouter(tags=["health"])

# The checks' own threads: a probe neither waits behind requests for a thread nor piles up
# threads while a dependency hangs (a check past its timeout is abandoned, still holding one).
_CHECK_THREADS = anyio.CapacityLimiter(2)


@router.get("/health")
async def health() -> Health:
    return Health()


def _check_database(db: Database) -> None:
    with db.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _check_broker(celery: Celery, timeout: float) -> None:
    options = celery.conf.broker_transport_options or {}
    if celery.conf.broker_url == EMBEDDED_BROKER_URL:
        # The embedded broker is a set of folders: reachable when they are there to write in.
        for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            folder = options.get(key)
            if folder and not os.access(folder, os.W_OK | os.X_OK):
                raise OSError(f"broker folder {folder} is missing or not writable")
        return
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)


async def _failure(check: Callable[[], None], timeout: float) -> str | None:
    """None when ``check`` passes within ``timeout`` seconds, else what went wrong."""
    try:
        with anyio.fail_after(timeout):
            await anyio.to_thread.run_sync(check, abandon_on_cancel=True, limiter=_CHECK_THREADS)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except Exception as err:  # noqa: BLE001 - any failure means not ready; say which
        return f"{type(err).__name__}: {err}".strip()
    return None


@router.get("/ready", response_model=Ready, responses=error_responses(503))
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    timeout = state.settings.ready_timeout
    checks = {
        "database": lambda: _check_database(state.db),
        "broker": lambda: _check_broker(state.celery, timeout),
    }
    failures: dict[str, str | None] = {}

    async def run(name: str) -> None:
        failures[name] = await _failure(checks[name], timeout)

    async with anyio.create_task_group() as group:
        for name in checks:
            group.start_soon(run, name)
    failed = {name: reason for name, reason in failures.items() if reason is not None}
    if failed:
        message = "not ready: " + "; ".join(f"{name} unreachable ({reason})" for name, reason in failed.items())
        details = [{"component": name, "message": reason} for name, reason in failed.items()]
        body = error_body("not_ready", message, details=details)
        return JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER})
    return JSONResponse(Ready(checks={name: "ok" for name in checks}).model_dump())
