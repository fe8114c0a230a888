"""A Redis broker stopped and started again while jobs wait: real workers, a Redis server of
the test's own (on a free loopback port, so the shared one is untouched), PostgreSQL, and
the default timings of the reconciler."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis
from conftest_service import free_port, stop_process, wait_for
from queue_support import worker_environment


class RedisServer:
    """A redis-server without persistence: stopping it loses every message."""

    def __init__(self, folder):
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self._answers, 15, 0.1, "redis-server to answer")

    def _answers(self) -> bool:
        try:
            return redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_queued_jobs_start_within_30s_of_the_broker_coming_back(tmp_path_factory, tiny_model_path, own_redis):
    # Production timings (queue_check_interval, reconcile_interval): only the worker's
    # progress writes are made frequent, to see the jobs start.
    defaults = dict(heartbeat_interval=10.0, heartbeat_timeout=120.0, reconcile_interval=30.0, queue_check_interval=3.0)
    with worker_environment(tmp_path_factory, tiny_model_path, own_redis.url, **defaults) as env:
        workers = [env.start_worker() for _ in range(2)]
        busy = [env.submit(max_steps=100_000, checkpoint_every=100_000) for _ in workers]
        for job_id in busy:
            env.wait_status(job_id, {"running"}, 180)
        # Both workers busy: this job's token waits in Redis, and is lost with it.
        waiting = env.submit(max_steps=2)
        own_redis.stop()
        during = env.submit(max_steps=2)  # the send fails; the API still answers 201
        for job_id in busy:  # the workers free up during the outage
            env.client.post(f"/v1/jobs/{job_id}/cancel", headers=env.headers)
            env.wait_status(job_id, {"cancelled"}, 60)
        assert [env.job(job_id)["status"] for job_id in (waiting, during)] == ["queued", "queued"]

        own_redis.start()
        restarted = time.monotonic()
        for job_id in (waiting, during):
            env.wait_status(job_id, {"running", "succeeded", "failed", "cancelled"}, 30)
        assert time.monotonic() - restarted < 30
        for job_id in (waiting, during):
            assert env.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 120)["status"] == "succeeded", env.logs()
        assert all(worker.poll() is None for worker in workers), env.logs()
