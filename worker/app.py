"""The Celery app of ``celery -A worker.app worker`` and ``rlora worker``, with its task.

Settings come from the environment of the worker process.
"""

from __future__ import annotations

from functools import cache

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from service.db import Database
from service.jobs.queue import TASK_NAME, create_celery
from service.settings import get_settings
from worker.reconciler import Reconciler
from worker.runner import run_job

settings = get_settings()
app = create_celery(settings)


@cache
def database() -> Database:
    # Made on first use, in the process that runs tasks (after any fork).
    return Database(settings.database)


@worker_process_init.connect
def _fresh_connections(**_) -> None:
    # With a forking pool (celery -A worker.app worker), a child must not reuse the
    # connections it inherited from the parent.
    database().engine.dispose(close=False)


@app.task(name=TASK_NAME, bind=True)
def train_job(self, job_id: str) -> None:
    run_job(settings, database(), job_id, worker=self.request.hostname or "worker")


_reconciler: list[Reconciler] = []


@worker_ready.connect
def _start_reconciler(**_) -> None:
    reconciler = Reconciler(settings, database(), app)
    reconciler.start()
    _reconciler.append(reconciler)


@worker_shutdown.connect
def _stop_reconciler(**_) -> None:
    for reconciler in _reconciler:
        reconciler.stop()
