"""Keeping the broker in step with the database, in every process of the service.

The database is the source of truth. Two checks:

- Every ``queue_check_interval`` seconds, the tokens waiting in each queue are compared with
  the jobs that could start, and the difference is sent: a token lost with a broker's restart,
  or never sent because the broker was down, is made good within seconds of the broker
  answering, and a healthy queue gets nothing more (4 queued jobs, 4 tokens). One process
  at a time tops up (a database lock); any number may run.
- Every ``reconcile_interval`` seconds, a running job whose worker stopped beating for
  ``heartbeat_timeout`` goes back to the queue (its next attempt resumes from the last
  checkpoint). A worker that is stopped gives its job back itself, at once.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from celery import Celery

from service.db import Database
from service.jobs import scheduling, states
from service.jobs.queue import DEVICE_CLASSES, BrokerUnavailable, queue_name, send_token, waiting_tokens
from service.jobs.states import Status
from service.models import utcnow
from service.settings import Settings

log = logging.getLogger(__name__)


def _queues(settings: Settings) -> list[str]:
    return [queue_name(settings, device_class) for device_class in DEVICE_CLASSES]


def requeue_lost_jobs(settings: Settings, db: Database) -> dict[str, int]:
    """Running jobs of dead workers back to the queue; how many were requeued, (asked to
    cancel) ended cancelled, or (their workers lost ``max_job_attempts`` times) failed. Their
    tokens come with the next top-up."""
    counts = {"requeued": 0, "cancelled": 0, "failed": 0}
    silent_since = utcnow() - timedelta(seconds=settings.heartbeat_timeout)
    with db.session() as session:
        for job in states.lost_jobs(session, _queues(settings), silent_since):
            # The reason is the tenant's to read (an event, an error): no host or process names.
            reason = f"no heartbeat for {settings.heartbeat_timeout:g}s"
            worker = job.worker
            new = states.worker_lost(session, job, reason, settings.max_job_attempts)
            if new is not None:
                log.warning("job %s: worker %s lost; the job is %s", job.id, worker, new)
                counts[{Status.QUEUED: "requeued", Status.CANCELLED: "cancelled", Status.FAILED: "failed"}[new]] += 1
    return counts


def _owed(settings: Settings, session, waiting: dict[str, int]) -> dict[str, int]:
    startable = scheduling.startable_jobs(session, list(waiting), settings.max_running_jobs_per_tenant)
    return {queue: count - waiting[queue] for queue, count in startable.items() if count > waiting[queue]}


def top_up(settings: Settings, db: Database, celery: Celery) -> int | None:
    """Send each queue the tokens it lacks; how many were sent, or None if the broker did
    not answer (tokens are still owed; the next check tries again)."""
    queues = _queues(settings)
    try:
        with db.session() as session:
            if not _owed(settings, session, waiting_tokens(celery, queues)):
                return 0
            with scheduling.top_up_lock(session) as locked:
                if not locked:
                    return 0  # another process is topping up now
                # Counted again under the lock: the other process may just have sent them.
                owed = _owed(settings, session, waiting_tokens(celery, queues))
                sent = 0
                for queue, count in owed.items():
                    for _ in range(count):
                        if not send_token(celery, queue):
                            return None
                        sent += 1
                session.commit()
    except BrokerUnavailable as err:
        log.debug("the broker does not answer: %s", err)
        return None
    if sent:
        log.info("sent %d token(s): %s", sent, owed)
    return sent


def reconcile(settings: Settings, db: Database, celery: Celery) -> dict[str, int]:
    """Both checks once (tests, and the first pass of ``Reconciler``)."""
    counts = requeue_lost_jobs(settings, db)
    counts["sent"] = top_up(settings, db, celery) or 0
    return counts


class Reconciler(threading.Thread):
    """Runs both checks, each at its interval, until stopped."""

    def __init__(self, settings: Settings, db: Database, celery: Celery):
        super().__init__(name="rlora-reconciler", daemon=True)
        self.settings = settings
        self.db = db
        self.celery = celery
        self.stopped = threading.Event()

    def run(self) -> None:
        next_lost_check = 0.0
        broker_answered = True
        while True:
            try:
                if time.monotonic() >= next_lost_check:
                    next_lost_check = time.monotonic() + self.settings.reconcile_interval
                    requeue_lost_jobs(self.settings, self.db)
                answered = top_up(self.settings, self.db, self.celery) is not None
                if answered != broker_answered:  # logged when it changes, not at every pass
                    if answered:
                        log.warning("the broker answers again; tokens owed were sent")
                    else:
                        log.warning("the broker does not answer; tokens owed are sent when it does")
                    broker_answered = answered
            except Exception:  # noqa: BLE001 - keep reconciling through a database hiccup
                log.exception("reconcile pass failed")
            if self.stopped.wait(self.settings.queue_check_interval):
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def start_reconciler(settings: Settings, db: Database, celery: Celery) -> Reconciler:
    reconciler = Reconciler(settings, db, celery)
    reconciler.start()
    return reconciler
