"""The Celery app of ``rlora worker`` (or ``celery -A worker.app worker``), with its task.

Settings come from the environment of the worker process. Each message is a token: the task
runs the next job its queue may start (worker.runner), chosen by the database.
"""

from __future__ import annotations

import logging
import threading
from functools import cache

from celery.apps.worker import install_worker_term_handler
from celery.signals import setup_logging, worker_ready, worker_shutdown, worker_shutting_down
from prometheus_client import start_http_server

from service.db import Database
from service.jobs.queue import TASK_NAME, create_celery
from service.jobs.reconciler import Reconciler, start_reconciler, top_up
from service.logs import configure_logging, quiet_progress_bars
from service.metrics import worker_metrics
from service.settings import get_settings
from worker.runner import run_next

log = logging.getLogger(__name__)

settings = get_settings()
app = create_celery(settings)
# One job at a time, in the worker's own process, however it is started: the stop signals
# reach the training loop only there (a forked pool child would never see them, and a stop
# would wait for the whole job).
app.conf.update(worker_pool="solo", worker_concurrency=1)

# Set when this worker begins to shut down: its running job stops at the trainer's next
# check and goes back to the queue.
shutting_down = threading.Event()


@cache
def database() -> Database:
    return Database(settings.database)


@app.task(name=TASK_NAME, bind=True)
def next_job(self, queue: str) -> None:
    if shutting_down.is_set():
        return  # the token is acknowledged unused; the reconciler sends one for the job
    status = run_next(settings, database(), queue, worker=self.request.hostname or "worker", shutting_down=shutting_down)
    if status is not None:
        # The job left `running`: its tenant has a slot again, or the job itself is queued
        # again; tokens for what may start now, at once rather than at the next check.
        top_up(settings, database(), app)


_reconciler: list[Reconciler] = []


@setup_logging.connect
def _log_as_the_service(loglevel=None, **_) -> None:
    # Handled here, Celery leaves logging alone: the service's format, at the level of
    # Celery's --loglevel (`rlora worker` passes its own), and no redirected stdout.
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel
    configure_logging(str(level or settings.log_level or "info").lower(), settings.log_format)
    quiet_progress_bars()


@worker_ready.connect
def _on_ready(sender, **_) -> None:
    # Every stop signal is a warm shutdown. Celery's cold one (SIGQUIT, a second SIGINT)
    # cancels the running task from inside the signal handler, which with the solo pool
    # raises NotImplementedError in the middle of a training step; the warm one only sets
    # flags, and the job gives itself back within a step (worker.runner).
    # Not verbose: Celery would print its line to stdout; the event below says it in the log.
    for signal_name in ("SIGTERM", "SIGQUIT", "SIGINT"):
        install_worker_term_handler(sender.controller, sig=signal_name, verbose=False)
    _reconciler.append(start_reconciler(settings, database(), app))
    if settings.worker_metrics_port is not None:
        start_http_server(settings.worker_metrics_port, registry=worker_metrics().registry)


@worker_shutting_down.connect
def _stop_the_running_job(sig=None, **_) -> None:
    shutting_down.set()
    log.info("worker stopping (%s): a running job goes back to the queue at its next step", sig)


@worker_shutdown.connect
def _stop_reconciler(**_) -> None:
    for reconciler in _reconciler:
        reconciler.stop()
