"""The sending side of the queue: queue names, the Celery app configured from settings, and
sending a job. Importing it does not import the trainer.

The broker carries job ids only; the database is the source of truth.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu import Exchange, Queue

from service.settings import Settings

TASK_NAME = "rlora.train"
DEVICE_CLASSES = ("cpu", "gpu")

log = logging.getLogger(__name__)


def queue_name(settings: Settings, device_class: str) -> str:
    return f"{settings.queue_prefix}.{device_class}"


def queue_for(settings: Settings, device: str) -> str:
    """The queue of a job for ``device`` (a training setting: cpu, cuda or auto)."""
    device_class = {"cpu": "cpu", "cuda": "gpu"}.get(device, settings.auto_device_class)
    return queue_name(settings, device_class)


def create_celery(settings: Settings) -> Celery:
    app = Celery("rlora")
    # Each queue gets its own exchange and key; left out, Celery would route every queue
    # through the default queue's exchange.
    names = [queue_name(settings, device_class) for device_class in DEVICE_CLASSES]
    queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names]
    config = dict(
        task_queues=queues,
        task_default_queue=queues[0].name,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A job's message is acknowledged only when the job is done, one job per worker
        # process at a time; a message whose worker dies is given back to the queue.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # An API request must not hang on a broker outage: the job is in the database and
        # the reconciler sends its message again later.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    )
    if settings.embedded_broker:
        # kombu's filesystem transport: messages are files in one folder, which the API and
        # the worker (same host) both use; no broadcast, so no remote control.
        folder = settings.broker_dir / "messages"
        processed = settings.broker_dir / "processed"
        # Exchange-to-queue bindings; kombu's default is a folder in the working directory.
        control = settings.broker_dir / "control"
        for path in (folder, processed, control):
            path.mkdir(parents=True, exist_ok=True)
        config.update(
            broker_url="filesystem://",
            broker_transport_options={
                "data_folder_in": str(folder),
                "data_folder_out": str(folder),
                "processed_folder": str(processed),
                "control_folder": str(control),
                "store_processed": False,
                "polling_interval": 0.5,
            },
            worker_enable_remote_control=False,
        )
    else:
        config.update(
            broker_url=settings.broker_url,
            # Redis gives an unacknowledged message back only after this many seconds; the
            # reconciler usually gets there first, so keep it long to avoid duplicates.
            broker_transport_options={"visibility_timeout": 6 * 3600},
        )
    app.conf.update(config)
    return app


def enqueue_job(app: Celery, job_id: str, queue: str) -> bool:
    """Send a job's id to its queue; False (logged) if the broker is unreachable."""
    try:
        app.send_task(TASK_NAME, args=[job_id], queue=queue)
    except Exception:  # noqa: BLE001 - any broker failure leaves the job for the reconciler
        log.exception("could not enqueue job %s on %s; the reconciler will retry", job_id, queue)
        return False
    return True
