"""Prometheus metrics (the ``prometheus_client`` library), served at ``/metrics``.

Who serves what:

- every API process: its HTTP requests (``rlora_http_*``, by route template, method and status)
  and, read from the database at each scrape, the cluster's jobs (by status, queue depth and the
  oldest queued job's age per device class, running jobs' heartbeat age), tenants and adapters.
  With ``rlora serve --workers N`` the processes share one port, so a scrape reaches any one of
  them: their counters and histograms are summed through prometheus_client's multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR``, which `rlora serve` sets to a fresh folder);
- the process holding an inference engine (`rlora engine`, or the API process in the embedded
  default): generation (tokens, time to first token, batch size, finished requests) through a
  `rlora.serve.ServingObserver` (`service.engine.local`), and the engine's adapter cache and base models, read from its
  ``stats()`` at each scrape;
- every worker, on ``RLORA_WORKER_METRICS_PORT``: its jobs' durations, training throughput and
  steps, heartbeats. A worker is one process running one job, so its own port is the plain way;
  pushing through the database would add writes to every step for what a scrape reads anyway.

Labels never hold a tenant id, a key or a raw path: routes are templates (``/v1/jobs/{job_id}``),
device classes and base models are the operator's names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from functools import cache

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from service.db import Database
from service.jobs.queue import DEVICE_CLASSES, queue_name
from service.jobs.states import Status
from service.models import Adapter, Job, Tenant, utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# prometheus_client's own variable: where the processes of one `rlora serve --workers N` keep
# their values for each other (set by the command before the processes start).
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# --- HTTP (API processes) ---------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "rlora_http_requests", "HTTP requests answered, by method, route template and status", ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "rlora_http_request_duration_seconds",
    "seconds from a request's arrival to the end of its answer (a stream's last byte), by method, route template and status",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# --- Generation (the process holding an engine) ----------------------------------------------

GENERATED_TOKENS = Counter("rlora_generated_tokens", "tokens generated, by base model (its rate is tokens per second)", ["base_model"])
GENERATION_REQUESTS = Counter("rlora_generation_requests", "generation requests finished, by base model and finish reason", ["base_model", "finish_reason"])
TIME_TO_FIRST_TOKEN = Histogram(
    "rlora_generation_time_to_first_token_seconds", "seconds from a request's submission to its first token, by base model",
    ["base_model"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram(
    "rlora_generation_batch_size", "requests decoded together in one decode step, by base model",
    ["base_model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class EngineCollector(Collector):
    """An engine's adapter cache and base models, from its ``stats()`` at each scrape
    (``stats`` returns None while the process has no engine)."""

    def __init__(self, stats: Callable[[], dict | None]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        for name, help_text, key in (
            ("rlora_adapter_cache_bytes", "bytes of the adapters the cache keeps loaded", "adapter_bytes"),
            ("rlora_adapter_cache_capacity_bytes", "the adapter cache's bound, in bytes", "adapter_cache_bytes"),
            ("rlora_adapter_cache_adapters", "adapters the cache keeps loaded", "adapters"),
        ):
            yield GaugeMetricFamily(name, help_text, value=stats[key])
        for name, help_text, key in (
            ("rlora_adapter_cache_hits", "adapter lookups the cache answered", "adapter_cache_hits"),
            ("rlora_adapter_cache_misses", "adapter lookups that loaded the adapter from its folder", "adapter_cache_misses"),
            ("rlora_adapter_cache_evictions", "adapters dropped from the cache to make room", "adapter_cache_evictions"),
        ):
            yield CounterMetricFamily(name, help_text, value=stats[key])
        models = stats["base_models"]
        yield GaugeMetricFamily("rlora_base_models_loaded", "base models loaded by the engine", value=len(models))
        for name, help_text, key in (
            ("rlora_generation_running", "requests decoding, by base model", "running"),
            ("rlora_generation_pending", "requests waiting for a row, by base model", "pending"),
            ("rlora_kv_cache_bytes", "bytes of the KV cache allocated, by base model", "kv_cache_bytes"),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["base_model"])
            for model, values in models.items():
                family.add_metric([model], values[key])
            yield family


# --- The cluster's jobs (API processes, from the database) -------------------------------------


class JobsCollector(Collector):
    """Jobs by status, queue depth and the oldest queued job's age per device class, running jobs
    and their oldest heartbeat's age per device class (a worker that stopped beating shows as a
    growing age before the reconciler requeues its job), tenants and adapters: a few grouped
    counts on indexed columns at each scrape. The same on every API process: aggregate with
    ``max`` rather than ``sum``."""

    def __init__(self, settings: Settings, db: Database):
        self._db = db
        self._classes = {queue_name(settings, device_class): device_class for device_class in DEVICE_CLASSES}

    def collect(self) -> Iterator[Metric]:
        try:
            with self._db.session() as session:
                by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                queued = session.execute(
                    select(Job.queue, func.count(), func.min(Job.enqueued_at)).where(Job.status == Status.QUEUED).group_by(Job.queue)
                ).all()
                running = session.execute(
                    select(Job.queue, func.count(), func.min(func.coalesce(Job.heartbeat_at, Job.started_at)))
                    .where(Job.status == Status.RUNNING).group_by(Job.queue)
                ).all()
                tenants = session.scalar(select(func.count()).select_from(Tenant))
                adapters = session.scalar(select(func.count()).select_from(Adapter))
        except SQLAlchemyError as err:
            log.warning("metrics: the database did not answer (%s); jobs left out of this scrape", type(err).__name__)
            yield GaugeMetricFamily("rlora_database_up", "whether the last scrape could read the database", value=0)
            return
        yield GaugeMetricFamily("rlora_database_up", "whether the last scrape could read the database", value=1)
        jobs = GaugeMetricFamily("rlora_jobs", "jobs by status, every tenant's", labels=["status"])
        for status in Status:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        yield jobs
        now = utcnow()
        yield from self._per_class(
            queued, now,
            ("rlora_queue_depth", "queued jobs, by device class"),
            ("rlora_queue_oldest_age_seconds", "seconds the oldest queued job has waited, by device class (0: none)"),
        )
        yield from self._per_class(
            running, now,
            ("rlora_running_jobs", "running jobs, by device class"),
            ("rlora_running_oldest_heartbeat_age_seconds", "seconds since the stalest heartbeat of a running job, by device class (0: none)"),
        )
        yield GaugeMetricFamily("rlora_tenants", "tenants", value=tenants)
        yield GaugeMetricFamily("rlora_adapters", "adapters stored, every tenant's", value=adapters)

    def _per_class(self, rows: Iterable, now, count: tuple[str, str], age: tuple[str, str]) -> Iterator[Metric]:
        counts = dict.fromkeys(DEVICE_CLASSES, 0)
        ages = dict.fromkeys(DEVICE_CLASSES, 0.0)
        for queue, number, oldest in rows:
            device_class = self._classes.get(queue)
            if device_class is None:
                continue  # a queue of another prefix (settings changed since)
            counts[device_class] += number
            if oldest is not None:
                ages[device_class] = max(ages[device_class], (now - oldest).total_seconds())
        for (name, help_text), values in ((count, counts), (age, ages)):
            family = GaugeMetricFamily(name, help_text, labels=["device_class"])
            for device_class, value in values.items():
                family.add_metric([device_class], value)
            yield family


# --- Workers ------------------------------------------------------------------------------------


class WorkerMetrics:
    """A worker's metrics, in a registry of their own (served on its metrics port; never written
    to the API's multiprocess folder)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)  # its memory and CPU, as the API's default registry has
        self.job_duration = Histogram(
            "rlora_job_duration_seconds", "seconds of one attempt at a job, from its claim to its outcome, by device class and outcome",
            ["device_class", "outcome"], registry=self.registry,
            buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400),
        )
        self.tokens_per_second = Gauge(
            "rlora_training_tokens_per_second", "training tokens per second of the running job (0: none running)", registry=self.registry,
        )
        self.training_steps = Counter("rlora_training_steps", "optimiser steps trained", ["device_class"], registry=self.registry)
        self.running = Gauge("rlora_worker_running_jobs", "jobs this worker is running (0 or 1)", registry=self.registry)
        self.heartbeats = Counter("rlora_worker_heartbeats", "heartbeats of the running job, by result (ok, failed)", ["result"], registry=self.registry)
        for result in ("ok", "failed"):  # both series from the start: a rate over a missing series is no alert
            self.heartbeats.labels(result)
        self.last_heartbeat = Gauge(
            "rlora_worker_last_heartbeat_timestamp_seconds", "Unix time of the running job's last heartbeat written", registry=self.registry,
        )

    def heartbeat(self, ok: bool) -> None:
        self.heartbeats.labels("ok" if ok else "failed").inc()
        if ok:
            self.last_heartbeat.set(time.time())


@cache
def worker_metrics() -> WorkerMetrics:
    """This process's worker metrics (made on first use: only a worker has them)."""
    return WorkerMetrics()


# --- Exposition -------------------------------------------------------------------------------


class _Joined:
    """Several collectors (or registries) as one, for one exposition."""

    def __init__(self, sources: Iterable):
        self._sources = list(sources)

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            yield from source.collect()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_DIR_VARIABLE) or None


def process_registry():
    """This process's own metrics (HTTP, generation, the process collectors), or, in
    multiprocess mode, every process's of this `rlora serve`, summed."""
    folder = multiprocess_dir()
    if folder is None:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    return registry


def exposition(*sources) -> bytes:
    """The text format of ``sources`` (registries or collectors), for a ``/metrics`` answer."""
    return generate_latest(_Joined(sources))
