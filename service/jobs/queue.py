"""The broker's side of the queue: queue names, the Celery app configured from settings,
sending tokens and counting those waiting. Importing it does not import the trainer.

The broker carries tokens, not jobs: a token on ``<prefix>.<class>`` says "a job of this
device class can start". The worker that takes one asks the database which job
(``service.jobs.scheduling.claim_next``): the database is the source of truth, and the
choice between tenants is made when a worker is free, not when a job is submitted.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError

from service.settings import Settings

TASK_NAME = "rlora.next_job"  # one argument: the queue the token came from
DEVICE_CLASSES = ("cpu", "gpu")

# kombu's filesystem transport; the host is named only so that kombu does not warn, at every
# connection, that it assumed one.
EMBEDDED_BROKER_URL = "filesystem://localhost//"
BROKER_TIMEOUT = 2.0  # seconds to connect to the broker before counting it down
BROKER_READ_TIMEOUT = 10.0  # seconds a connected broker may take to answer

log = logging.getLogger(__name__)


def queue_name(settings: Settings, device_class: str) -> str:
    return f"{settings.queue_prefix}.{device_class}"


def device_class_for(settings: Settings, device: str) -> str:
    """The device class of a job for ``device`` (a training setting: cpu, cuda or auto)."""
    return {"cpu": "cpu", "cuda": "gpu"}.get(device, settings.auto_device_class)


def queue_for(settings: Settings, device: str) -> str:
    """The queue of a job for ``device``."""
    return queue_name(settings, device_class_for(settings, device))


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
        # A token is acknowledged only when its job is done, so a busy worker holds no
        # token another worker could use (one job per worker process at a time).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # An API request must not hang on a broker outage: the job is in the database and
        # the reconciler sends its token once the broker answers.
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
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        config.update(
            broker_url=EMBEDDED_BROKER_URL,
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
            # Redis gives an unacknowledged token (its worker died) back after this many
            # seconds; the reconciler has long since sent a fresh one, so the late one only
            # finds nothing to start. Long, so that a running job's token is never doubled.
            # Every socket call is bounded: a Redis that accepts connections but never answers
            # (stopped, partitioned) must not hang a submission, /ready or the reconciler.
            broker_transport_options={
                "visibility_timeout": 6 * 3600,
                "socket_connect_timeout": BROKER_TIMEOUT,
                # Above kombu's 1 s BRPOP wait, on which a worker's consumer blocks legitimately.
                "socket_timeout": BROKER_READ_TIMEOUT,
                "socket_keepalive": True,
            },
        )
    app.conf.update(config)
    return app


class BrokerUnavailable(Exception):
    """The broker did not answer."""


def send_token(app: Celery, queue: str) -> bool:
    """Tell ``queue``'s workers that a job can start; False (logged) if the broker is unreachable."""
    try:
        app.send_task(TASK_NAME, args=[queue], queue=queue)
    except Exception as err:  # noqa: BLE001 - any broker failure leaves the token owed to the reconciler
        log.warning("could not send a token to %s (%s: %s); the reconciler will", queue, type(err).__name__, err)
        return False
    return True


def waiting_tokens(app: Celery, queues: list[str]) -> dict[str, int]:
    """The tokens waiting in each of ``queues`` (taken but unacknowledged ones not counted).

    Raises BrokerUnavailable when the broker does not answer within a few seconds.
    """
    with app.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT)
            channel = connection.default_channel
            # Not passive: a passive declare of an empty Redis queue (no key) is a 404.
            return {queue: channel.queue_declare(queue=queue).message_count for queue in queues}
        except (OperationalError, *connection.connection_errors, *connection.channel_errors) as err:
            raise BrokerUnavailable(str(err)) from err
