"""Finding jobs the broker or a worker lost, and queueing them again.

The database is the source of truth: a running job whose heartbeat stopped goes back to the
queue (its next attempt resumes from the last checkpoint), and a queued job whose message
was never picked up is sent again. Claims are compare-and-set, so a duplicate message is
dropped by whichever worker gets it second.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from celery import Celery

from service.db import Database
from service.jobs import states
from service.jobs.queue import enqueue_job
from service.jobs.states import Status
from service.models import utcnow
from service.settings import Settings

log = logging.getLogger(__name__)


def reconcile(settings: Settings, db: Database, celery: Celery) -> dict[str, int]:
    """One pass; how many jobs were requeued (worker lost), resent (message lost) or ended."""
    counts = {"requeued": 0, "resent": 0, "cancelled": 0}
    now = utcnow()
    with db.session() as session:
        for job in states.lost_jobs(session, silent_since=now - timedelta(seconds=settings.heartbeat_timeout)):
            new = states.requeue_lost(session, job, f"no heartbeat from {job.worker} for {settings.heartbeat_timeout:g}s")
            if new == Status.QUEUED:
                log.warning("job %s: worker %s lost; queued again", job.id, job.worker)
                enqueue_job(celery, job.id, job.queue)
                counts["requeued"] += 1
            elif new == Status.CANCELLED:
                counts["cancelled"] += 1

        for job in states.unsent_jobs(session, queued_before=now - timedelta(seconds=settings.requeue_after)):
            if states.touch_enqueued(session, job, now):
                log.warning("job %s: queued since %s without a worker taking it; sent again", job.id, job.enqueued_at)
                enqueue_job(celery, job.id, job.queue)
                counts["resent"] += 1
    return counts


class Reconciler(threading.Thread):
    """Runs ``reconcile`` now and then every ``reconcile_interval`` seconds, until stopped."""

    def __init__(self, settings: Settings, db: Database, celery: Celery):
        super().__init__(name="rlora-reconciler", daemon=True)
        self.settings = settings
        self.db = db
        self.celery = celery
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                reconcile(self.settings, self.db, self.celery)
            except Exception:  # noqa: BLE001 - keep reconciling through a database hiccup
                log.exception("reconcile pass failed")
            if self.stopped.wait(self.settings.reconcile_interval):
                return

    def stop(self) -> None:
        self.stopped.set()
