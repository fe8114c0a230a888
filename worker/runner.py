"""Running one job: claim the next one, call the trainer, record the outcome. Celery-free.

The trainer knows nothing about the database; this module turns its callbacks into progress
rows, events and heartbeats, and its should-stop check into a read of the cancel flag and of
the worker's shutdown flag. A job stopped by a shutdown goes back to the queue, to resume
from its last checkpoint: a shutdown is never the job's failure.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from typing import Any

from rlora.adapter.folder import CONFIG_FILE
from rlora.training import Progress, TrainConfig, TrainingCancelled, train
from rlora.training.checkpoint import ADAPTER_DIR, CHECKPOINTS
from service.db import Database
from service.jobs import scheduling, states
from service.jobs.requests import mixture_file_ids, tenant_files, train_config
from service.jobs.states import Status
from service.logs import log_context, run_in_context
from service.metrics import worker_metrics
from service.models import Adapter, Job
from service.settings import Settings

log = logging.getLogger(__name__)

ERROR_MESSAGE_CHARS = 4000
STOP_CHECK_INTERVAL = 1.0  # seconds between reads of the cancel flag


def run_next(settings: Settings, db: Database, queue: str, worker: str, shutting_down: threading.Event) -> Status | None:
    """Claim the next job of ``queue`` (service.jobs.scheduling) and run it; the status this
    worker left it in (queued again if ``shutting_down`` was set meanwhile), or None if no
    job could start."""
    with db.session() as session:
        claimed = scheduling.claim_next(session, queue, worker, settings.max_running_jobs_per_tenant)
    if claimed is None:
        log.info("no job of %s can start now (none queued, or their tenants at their running limit)", queue)
        return None
    job, attempt = claimed
    # Every event of the attempt, the trainer's and the heartbeat's included, names the job.
    with log_context(job_id=job.id, tenant_id=job.tenant_id, attempt=attempt):
        log.info("job %s: attempt %d on %s", job.id, attempt, worker)
        return _Run(settings, db, job, attempt, shutting_down).execute()


def _jsonable(value: Any) -> Any:
    """Trainer values as plain JSON: tensor or numpy scalars unwrapped, NaN and infinities
    (a diverged loss) as null, since PostgreSQL's json type refuses them."""
    text = json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    return json.loads(text, parse_constant=lambda _constant: None)


class _Run:
    def __init__(self, settings: Settings, db: Database, job: Job, attempt: int, shutting_down: threading.Event):
        self.settings = settings
        self.db = db
        self.job = job
        self.attempt = attempt
        self.shutting_down = shutting_down
        self.output_dir = settings.jobs_dir / job.id
        self.owned = True  # False once the job moved on without us (we were presumed lost)
        self._last_progress = 0.0
        self._last_stop_check = 0.0
        self._stop = False
        # Wall-clock of this attempt: one job cannot hold a worker for ever (lost attempts are
        # capped too, so a job's whole time is bounded).
        self._deadline = time.monotonic() + settings.max_job_seconds
        self._heartbeat_done = threading.Event()
        self.metrics = worker_metrics()
        self.device_class = job.queue.rsplit(".", 1)[-1]  # queues are <prefix>.<class>
        self._steps_counted = 0

    # --- the run -------------------------------------------------------------------------

    def execute(self) -> Status | None:
        started = time.monotonic()
        self.metrics.running.set(1)
        status = None
        try:
            status = self._execute()
            return status
        finally:
            self.metrics.running.set(0)
            self.metrics.tokens_per_second.set(0)
            outcome = {Status.QUEUED: "requeued", None: "lost"}.get(status, str(status))
            self.metrics.job_duration.labels(self.device_class, outcome).observe(time.monotonic() - started)

    def _execute(self) -> Status | None:
        heartbeat = run_in_context(self._heartbeat, name=f"heartbeat-{self.job.id}", daemon=True)
        heartbeat.start()
        try:
            config = self._train_config()
            metrics = train(
                config,
                on_progress=self._on_progress,
                on_event=self._on_event,
                should_stop=self._should_stop,
                models_dir=self.settings.models_dir,
                cache_dir=self.settings.cache_dir,
            )
        except TrainingCancelled as stopped:
            if not self.owned:
                return None
            if self._past_deadline():
                limit = f"{self.settings.max_job_seconds:g}"
                return self._finish(Status.FAILED, error=("time_limit", f"the job ran past the limit of {limit} s ({stopped})"))
            return self._give_back() if self.shutting_down.is_set() else self._finish(Status.CANCELLED)
        except Exception as err:  # noqa: BLE001 - any training failure is the job's outcome
            if self.shutting_down.is_set():
                # Whatever broke while the worker stops is no verdict on the job: retry it.
                log.exception("job %s: error while the worker shuts down", self.job.id)
                return self._give_back()
            if isinstance(err, (ValueError, LookupError)):
                return self._finish(Status.FAILED, error=("invalid_input", str(err)))
            log.exception("job %s failed", self.job.id)
            return self._finish(Status.FAILED, error=("training_error", f"{type(err).__name__}: {err}"))
        finally:
            self._heartbeat_done.set()
            heartbeat.join()
        return self._succeed(_jsonable(metrics))

    def _train_config(self) -> TrainConfig:
        with self.db.session() as session:
            files = tenant_files(session, self.job.tenant_id, mixture_file_ids(self.job.mixture))
        # Stable per job: a retry after a lost worker resumes from its checkpoints here.
        return train_config(self.settings, self.job, files, self.output_dir)

    # --- trainer callbacks ---------------------------------------------------------------

    def _on_progress(self, progress: Progress) -> None:
        now = time.monotonic()
        last = progress.total_steps is not None and progress.step >= progress.total_steps
        if now - self._last_progress < self.settings.progress_interval and not last:
            return
        self._last_progress = now
        if progress.tokens_per_second is not None:
            self.metrics.tokens_per_second.set(progress.tokens_per_second)
        if progress.step > self._steps_counted:
            self.metrics.training_steps.labels(self.device_class).inc(progress.step - self._steps_counted)
            self._steps_counted = progress.step
        values = {
            name: _jsonable(getattr(progress, name))
            for name in ("step", "total_steps", "loss", "learning_rate", "tokens_per_second", "eta_seconds")
        }
        with self.db.session() as session:
            states.touch_running(session, self.job, self.attempt, ("progress", values), **values)

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "resumed":
            self._steps_counted = data.get("step", 0)  # steps trained before are counted already
        # Paths on the worker's disk are no business of the tenant's.
        data = {key: value for key, value in data.items() if key != "path"}
        values = {"phase": data["phase"]} if kind == "phase" else {}
        with self.db.session() as session:
            states.touch_running(session, self.job, self.attempt, (kind, _jsonable(data)), **values)

    def _past_deadline(self) -> bool:
        return time.monotonic() > self._deadline

    def _should_stop(self) -> bool:
        if self.shutting_down.is_set() or self._past_deadline():
            return True
        now = time.monotonic()
        if self._stop or now - self._last_stop_check < STOP_CHECK_INTERVAL:
            return self._stop
        self._last_stop_check = now
        with self.db.session() as session:
            state = states.run_state(session, self.job.id, self.attempt)
        if not state.owned:
            self.owned = False
        self._stop = state.cancel_requested or not self.owned
        return self._stop

    def _heartbeat(self) -> None:
        # A thread, not the progress callback: loading a model or one long step must not
        # look like a dead worker.
        while not self._heartbeat_done.wait(self.settings.heartbeat_interval):
            try:
                with self.db.session() as session:
                    owned = states.touch_running(session, self.job, self.attempt)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the reconciler is lenient
                log.exception("job %s: heartbeat failed", self.job.id)
                self.metrics.heartbeat(ok=False)
                continue
            self.metrics.heartbeat(ok=True)
            if not owned:
                self.owned = False
                self._stop = True
                return

    # --- outcomes ------------------------------------------------------------------------

    def _succeed(self, metrics: dict[str, Any]) -> Status | None:
        adapter_dir = self.output_dir / ADAPTER_DIR
        config_file = adapter_dir / CONFIG_FILE
        config = json.loads(config_file.read_text()) if config_file.is_file() else {"adapter": self.job.adapter}
        with self.db.session() as session:
            adapter = Adapter(
                tenant_id=self.job.tenant_id,
                job_id=self.job.id,
                base_model=self.job.base_model,
                config=config,
                path=str(adapter_dir),
                metrics=metrics,
                head_similarity=metrics.get("head_similarity"),
                routing=metrics.get("routing"),
                eval=metrics.get("eval"),
            )
            session.add(adapter)
            session.flush()
            succeeded = states.finish(session, self.job, self.attempt, Status.SUCCEEDED, {"adapter_id": adapter.id}, metrics=metrics)
            owned = succeeded or states.run_state(session, self.job.id, self.attempt).owned
        if not succeeded:
            if owned:
                # Asked to cancel after the trainer's last check: the answer was "running",
                # and the job ends as the user asked.
                return self._finish(Status.CANCELLED)
            log.warning("job %s finished training but is no longer ours; result dropped", self.job.id)
            return None
        self._drop_outputs(Status.SUCCEEDED)
        log.info("job %s succeeded: adapter %s", self.job.id, adapter.id)
        return Status.SUCCEEDED

    def _finish(self, status: Status, error: tuple[str, str] | None = None) -> Status | None:
        values: dict[str, Any] = {}
        data: dict[str, Any] = {}
        if error is not None:
            values = {"error_code": error[0], "error_message": error[1][:ERROR_MESSAGE_CHARS]}
            data = {"error": {"code": values["error_code"], "message": values["error_message"]}}
        with self.db.session() as session:
            if not states.finish(session, self.job, self.attempt, status, data, **values):
                return None
        self._drop_outputs(status)
        # The error's code only: its message may quote the tenant's data (it is the job's, in the database).
        log.info("job %s %s%s", self.job.id, status, f" ({error[0]})" if error else "")
        return status

    def _give_back(self) -> Status | None:
        """The worker stops: the job goes back to the queue, its checkpoints kept for the next attempt."""
        with self.db.session() as session:
            status = states.requeue(session, self.job, self.attempt, "the worker shut down")
        if status == Status.CANCELLED:
            self._drop_outputs(status)
        log.info("job %s: worker shutting down; the job is %s", self.job.id, status or "no longer ours")
        return status

    def _drop_outputs(self, status: Status) -> None:
        # Checkpoints (optimizer state included) only serve a resume; an ended job has none.
        # A job that ended without an adapter keeps nothing (a cancel may come after saving).
        shutil.rmtree(self.output_dir / CHECKPOINTS if status == Status.SUCCEEDED else self.output_dir, ignore_errors=True)
