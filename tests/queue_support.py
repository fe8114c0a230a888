"""What the queue, scheduling and worker tests share: an app with queues of its own on the
session's database and reading its tokens back from the embedded broker; real worker
processes on a fresh PostgreSQL database and a Redis broker.

A test module that uses ``queue_client`` imports it from here (a pytest fixture).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from contextlib import contextmanager

import pytest
from conftest_service import (
    REPO,
    dataset,
    fresh_postgres_database,
    job_body,
    make_settings,
    rlora_command,
    service_env,
    stop_process,
    submit_job,
    upload,
    wait_for,
)
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api.auth import create_tenant
from service.models import JobEvent

# Short enough for tests: a lost worker is noticed after 4 s, tokens checked every second.
WORKER_TIMING = dict(progress_interval=0.2, heartbeat_interval=0.5, heartbeat_timeout=4, reconcile_interval=1, queue_check_interval=1)


@pytest.fixture
def queue_client(service_settings, tmp_path_factory):
    """A client of an app whose queues (a fresh prefix) no other test uses, on the
    session's database (SQLite or PostgreSQL), with the embedded broker under its own home;
    its reconciler is left idle (long intervals) so that tests run each check themselves."""
    from service.api.app import create_app

    settings = make_settings(
        tmp_path_factory.mktemp("queue-home"), service_settings.database, queue_prefix=f"q{secrets.token_hex(4)}",
        max_active_jobs_per_tenant=40, max_running_jobs_per_tenant=2, queue_check_interval=3600, reconcile_interval=3600,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def tenant_headers(client, label: str = "t") -> dict[str, str]:
    with client.app.state.db.session() as session:
        _, key = create_tenant(session, f"{label}-{secrets.token_hex(4)}")
    return {"Authorization": f"Bearer {key}"}


def queued_jobs(client, headers, count: int) -> list[str]:
    """``count`` jobs of the tenant, queued on the app's cpu queue, in submission order."""
    file_id = upload(client, headers, dataset()).json()["id"]
    return [submit_job(client, headers, file_id)["id"] for _ in range(count)]


def tokens(client, device_class: str = "cpu") -> int:
    """Tokens waiting in the embedded broker for one of the app's queues."""
    settings = client.app.state.settings
    suffix = f".{settings.queue_prefix}.{device_class}.msg"
    return sum(path.name.endswith(suffix) for path in (settings.broker_dir / "messages").iterdir())


class WorkerEnv:
    """One database, home and set of queues, and the worker processes started on them."""

    def __init__(self, settings, client, headers, log_dir, timing: dict):
        self.settings = settings
        self.timing = timing
        self.client = client
        self.headers = headers
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def start_worker(self, **settings) -> subprocess.Popen:
        """A ``rlora worker`` process; ``settings`` (RLORA_<NAME>) beside the environment's."""
        s = self.settings
        env = service_env(
            home=s.home, database_url=s.database_url, broker_url=s.broker_url, queue_prefix=s.queue_prefix, **{**self.timing, **settings},
        )
        with open(self.log_dir / f"worker-{len(self.processes)}.log", "wb") as log:
            process = subprocess.Popen(
                rlora_command("worker", "--queues", "cpu"), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        return process

    def submit(self, **training) -> str:
        file_id = upload(self.client, self.headers, dataset(40)).json()["id"]
        response = self.client.post("/v1/jobs", headers=self.headers, json=job_body(file_id, **training))
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}", headers=self.headers).json()

    def events(self, job_id: str) -> list[dict]:
        return self.client.get(f"/v1/jobs/{job_id}/events", headers=self.headers, params={"limit": 100}).json()["data"]

    def has_event(self, job_id: str, kind: str) -> bool:
        with self.client.app.state.db.session() as session:
            return session.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.kind == kind).limit(1)) is not None

    def wait_status(self, job_id: str, statuses: set[str], timeout: float) -> dict:
        job = wait_for(lambda: (j := self.job(job_id))["status"] in statuses and j, timeout, 0.3, f"job {job_id} to be {statuses}")
        return job

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in sorted(self.log_dir.glob("worker-*.log")))


@contextmanager
def worker_environment(tmp_path_factory, tiny_model_path, broker_url: str, **timing):
    """A WorkerEnv on a fresh PostgreSQL database and the broker at ``broker_url``, its queues
    a fresh prefix; the workers it started are stopped on exit."""
    from service.api.app import create_app

    timing = {**WORKER_TIMING, **timing}
    home = tmp_path_factory.mktemp("worker-home")
    # The tiny base model, built once per test session, where the worker looks for it.
    shutil.copytree(tiny_model_path, home / "models" / "tiny")
    with fresh_postgres_database() as url:
        settings = make_settings(home, url, broker_url=broker_url, queue_prefix=f"rlora-test-{secrets.token_hex(4)}", **timing)
        app = create_app(settings)
        with TestClient(app) as client:
            with app.state.db.session() as session:
                _, key = create_tenant(session, "worker-tests")
            env = WorkerEnv(settings, client, {"Authorization": f"Bearer {key}"}, tmp_path_factory.mktemp("worker-logs"), timing)
            try:
                yield env
            finally:
                for process in env.processes:
                    stop_process(process)
