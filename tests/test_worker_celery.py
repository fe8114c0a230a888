"""The worker: a real Celery worker process on the Redis at 127.0.0.1, training on the tiny model.

The API runs in-process against the same PostgreSQL database and broker, so jobs go through
the real submission path.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import subprocess
import zipfile

import pytest
import redis
from conftest_service import (
    REDIS_URL,
    REPO,
    dataset,
    fresh_postgres_database,
    job_body,
    make_settings,
    rlora_command,
    service_env,
    stop_process,
    upload,
    wait_for,
)
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api.app import create_app
from service.api.auth import create_tenant
from service.models import JobEvent

TIMING = dict(progress_interval=0.2, heartbeat_interval=0.5, heartbeat_timeout=4, reconcile_interval=1, requeue_after=600)


class WorkerEnv:
    """One database, home and set of queues, and the worker processes started on them."""

    def __init__(self, settings, client, headers, log_dir):
        self.settings = settings
        self.client = client
        self.headers = headers
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def start_worker(self) -> subprocess.Popen:
        s = self.settings
        env = service_env(home=s.home, database_url=s.database_url, broker_url=s.broker_url, queue_prefix=s.queue_prefix, **TIMING)
        log = open(self.log_dir / f"worker-{len(self.processes)}.log", "wb")
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


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory, tiny_model_path):
    home = tmp_path_factory.mktemp("worker-home")
    # The tiny base model, built once per test session, where the worker looks for it.
    shutil.copytree(tiny_model_path, home / "models" / "tiny")
    prefix = f"rlora-test-{secrets.token_hex(4)}"
    with fresh_postgres_database() as url:
        settings = make_settings(home, url, broker_url=f"{REDIS_URL}/0", queue_prefix=prefix, **TIMING)
        app = create_app(settings)
        with TestClient(app) as client:
            with app.state.db.session() as session:
                _, key = create_tenant(session, "worker-tests")
            env = WorkerEnv(settings, client, {"Authorization": f"Bearer {key}"}, tmp_path_factory.mktemp("worker-logs"))
            try:
                yield env
            finally:
                for process in env.processes:
                    stop_process(process)
                connection = redis.Redis.from_url(settings.broker_url)
                for key in connection.scan_iter(f"*{prefix}*"):
                    connection.delete(key)


@pytest.fixture
def worker(worker_env):
    process = worker_env.start_worker()
    yield process
    stop_process(process)


def test_a_job_trains_to_success(worker_env, worker):
    job_id = worker_env.submit(max_steps=4)
    job = worker_env.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 180)
    assert job["status"] == "succeeded", (job, worker_env.logs())
    assert job["attempt"] == 1 and job["error"] is None
    assert job["progress"]["step"] == 4 and job["progress"]["total_steps"] == 4 and job["progress"]["eta_seconds"] == 0

    kinds = [e["kind"] for e in worker_env.events(job_id)]
    assert kinds[:2] == ["created", "started"] and kinds[-2:] == ["eval", "finished"]
    assert {"progress", "checkpoint"} <= set(kinds)

    metrics = worker_env.client.get(f"/v1/jobs/{job_id}/metrics", headers=worker_env.headers).json()
    assert metrics["final"] is True and [p["step"] for p in metrics["train_loss"]] == [1, 2, 3, 4]

    adapter = worker_env.client.get(f"/v1/adapters/{job['adapter_id']}", headers=worker_env.headers).json()
    assert adapter["job_id"] == job_id and adapter["base_model"] == "tiny"
    assert adapter["config"]["heads"] == 2 and adapter["config"]["rank"] == 2
    assert set(adapter["head_similarity"]) >= {"per_layer", "mean"}
    assert adapter["routing"] is not None and set(adapter["eval"]) == {"add"}
    assert {"loss", "accuracy"} <= set(adapter["eval"]["add"])

    download = worker_env.client.get(f"/v1/adapters/{adapter['id']}/download", headers=worker_env.headers)
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
    assert sorted(names) == [f"{adapter['id']}/adapter_config.json", f"{adapter['id']}/adapter_model.safetensors"]

    deleted = worker_env.client.delete(f"/v1/adapters/{adapter['id']}", headers=worker_env.headers)
    assert deleted.status_code == 200
    assert worker_env.job(job_id)["adapter_id"] is None
    assert not (worker_env.settings.jobs_dir / job_id / "adapter").exists()


def test_cancelling_a_running_job_stops_it(worker_env, worker):
    job_id = worker_env.submit(max_steps=100_000, checkpoint_every=100_000)
    wait_for(lambda: (worker_env.job(job_id)["progress"] or {}).get("step"), 180, 0.3, "training to start")
    response = worker_env.client.post(f"/v1/jobs/{job_id}/cancel", headers=worker_env.headers).json()
    assert response["status"] == "running" and response["cancel_requested"]
    job = worker_env.wait_status(job_id, {"cancelled", "failed", "succeeded"}, 15)
    assert job["status"] == "cancelled", (job, worker_env.logs())
    assert worker_env.events(job_id)[-1]["data"] == {"status": "cancelled"}
    assert job["adapter_id"] is None


def test_a_killed_worker_is_replaced_and_the_job_resumes(worker_env):
    first = worker_env.start_worker()
    # A tiny step takes well under 0.1 s on a quiet machine: leave many steps after the first
    # checkpoint, and watch for it in the database directly, to kill the worker mid-run.
    job_id = worker_env.submit(max_steps=60, checkpoint_every=2)
    wait_for(lambda: worker_env.has_event(job_id, "checkpoint"), 180, 0.02, "the first checkpoint")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert worker_env.job(job_id)["status"] == "running", "the database still thinks it runs"

    second = worker_env.start_worker()
    try:
        job = worker_env.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 240)
    finally:
        stop_process(second)
    assert job["status"] == "succeeded", (job, worker_env.logs())
    assert job["attempt"] == 2
    events = worker_env.events(job_id)
    kinds = [e["kind"] for e in events]
    assert kinds.count("started") == 2 and "requeued" in kinds
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] >= 2, "the second attempt started from a checkpoint"
    loss_steps = [point["step"] for point in job["metrics"]["train_loss"]]
    assert loss_steps == list(range(1, 61))
