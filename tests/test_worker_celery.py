"""The worker: a real Celery worker process on the Redis at 127.0.0.1, training on the tiny model.

The API runs in-process against the same PostgreSQL database and broker, so jobs go through
the real submission path.
"""

from __future__ import annotations

import io
import json
import os
import signal
import zipfile

import httpx
import pytest
import redis
import torch
from conftest_service import dataset, free_port, job_body, require_redis, stop_process, upload, wait_for
from prometheus_client.parser import text_string_to_metric_families
from queue_support import worker_environment


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory, tiny_model_path):
    with worker_environment(tmp_path_factory, tiny_model_path, f"{require_redis()}/0") as env:
        yield env
        connection = redis.Redis.from_url(env.settings.broker_url)
        for key in connection.scan_iter(f"*{env.settings.queue_prefix}*"):
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
    assert kinds[:3] == ["created", "started", "phase"] and kinds[-3:] == ["eval", "phase", "finished"]
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


def test_a_worker_serves_its_metrics_and_logs_json_lines_naming_the_job(worker_env):
    port = free_port()
    # Heartbeats every 0.05 s: the short job surely beats before it ends.
    process = worker_env.start_worker(worker_metrics_port=port, log_format="json", heartbeat_interval=0.05)
    log_path = worker_env.log_dir / f"worker-{len(worker_env.processes) - 1}.log"
    try:
        job_id = worker_env.submit(max_steps=3)
        job = worker_env.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 180)
        assert job["status"] == "succeeded", (job, worker_env.logs())
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        stop_process(process)
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert metrics[("rlora_job_duration_seconds_count", (("device_class", "cpu"), ("outcome", "succeeded")))] == 1
    assert metrics[("rlora_training_steps_total", (("device_class", "cpu"),))] == 3
    assert metrics[("rlora_worker_heartbeats_total", (("result", "ok"),))] >= 1
    assert metrics[("rlora_worker_heartbeats_total", (("result", "failed"),))] == 0
    assert metrics[("rlora_worker_running_jobs", ())] == 0 and ("process_resident_memory_bytes", ()) in metrics
    # Every line of the worker's output is one JSON event (no banner, no progress bars); the
    # job's events name it, its tenant and the attempt.
    lines = log_path.read_text().splitlines()
    assert [line for line in lines if not line.startswith("{")] == [], log_path.read_text()[-3000:]
    events = [json.loads(line) for line in lines]
    runner = [e for e in events if e["logger"] == "worker.runner"]
    assert runner and all(e["job_id"] == job_id and e["attempt"] == 1 and e["tenant_id"] for e in runner)
    assert not [e for e in events if e["logger"] in ("celery.redirected", "kombu.connection")]


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


def adapter_tensors(env, job: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(env.settings.jobs_dir / job["id"] / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted_job(worker_env) -> dict:
    """The job the shutdown tests interrupt, run once without interruption."""
    process = worker_env.start_worker()
    try:
        job = worker_env.wait_status(worker_env.submit(**INTERRUPTED), {"succeeded", "failed", "cancelled"}, 240)
    finally:
        stop_process(process)
    assert job["status"] == "succeeded", (job, worker_env.logs())
    return job


INTERRUPTED = dict(max_steps=30, checkpoint_every=2)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGQUIT])
def test_a_stopped_worker_gives_its_job_back_at_once(worker_env, uninterrupted_job, stop_signal):
    first = worker_env.start_worker()
    job_id = worker_env.submit(**INTERRUPTED)
    wait_for(lambda: worker_env.has_event(job_id, "checkpoint"), 180, 0.02, "the first checkpoint")
    first.send_signal(stop_signal)
    job = worker_env.wait_status(job_id, {"queued", "failed", "succeeded", "cancelled"}, 15)
    assert job["status"] == "queued" and job["error"] is None, (job, worker_env.logs())
    # Given back by the worker itself (it beats until then), not requeued by a heartbeat timeout.
    requeued = [e for e in worker_env.events(job_id) if e["kind"] == "requeued"]
    assert [e["data"]["reason"] for e in requeued] == ["the worker shut down"]
    assert first.wait(60) == 0, worker_env.logs()
    assert "NotImplementedError" not in worker_env.logs()

    second = worker_env.start_worker()
    try:
        job = worker_env.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 240)
    finally:
        stop_process(second)
    assert job["status"] == "succeeded" and job["attempt"] == 2, (job, worker_env.logs())
    assert [e["data"]["step"] for e in worker_env.events(job_id) if e["kind"] == "resumed"][0] >= 2
    expected, resumed = adapter_tensors(worker_env, uninterrupted_job), adapter_tensors(worker_env, job)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected), "resumed = uninterrupted"


def test_a_cancel_during_the_final_evaluation_ends_the_job_cancelled(worker_env, worker):
    # Two steps, then a long evaluation: 256 validation examples (the limit), one a batch. Its
    # length rests on the number of examples, not on how soon the model ends its answers (the
    # pretrained default answers `add` problems in two or three tokens), and is well over the
    # second the worker may take to see the cancel.
    file_id = upload(worker_env.client, worker_env.headers, dataset(600)).json()["id"]
    body = job_body(file_id, max_steps=2, batch_size=1, validation_share=0.5, eval_max_examples=256, eval_max_new_tokens=48)
    job_id = worker_env.client.post("/v1/jobs", headers=worker_env.headers, json=body).json()["id"]
    wait_for(lambda: worker_env.job(job_id)["phase"] == "evaluating", 180, 0.05, "the final evaluation")
    response = worker_env.client.post(f"/v1/jobs/{job_id}/cancel", headers=worker_env.headers).json()
    assert response["status"] == "running" and response["cancel_requested"], response
    job = worker_env.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 60)
    assert job["status"] == "cancelled" and job["adapter_id"] is None, (job, worker_env.logs())
    assert "eval" not in [e["kind"] for e in worker_env.events(job_id)], "stopped inside the evaluation"
    assert not (worker_env.settings.jobs_dir / job_id).exists()
