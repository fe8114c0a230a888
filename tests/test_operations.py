"""Operations: /metrics read with the Prometheus client's own parser after a real job and real
generations, and the logs (JSON lines with request, tenant and job ids; nothing secret in them).

One SQLite app of its own; the job runs in this process (worker.runner), the generation on the
app's in-process engine, as in the embedded default.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import subprocess
import sys
import threading

import httpx
import pytest
from conftest_service import (
    REPO,
    dataset,
    database_url,
    free_port,
    make_settings,
    rlora_command,
    service_env,
    stop_process,
    submit_job,
    upload,
    wait_until_answering,
)
from queue_support import queue_client, queued_jobs, tenant_headers  # noqa: F401 - queue_client is a fixture
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.api.auth import create_tenant
from service.jobs.states import Status
from service.logs import configure_logging
from service.metrics import worker_metrics
from worker.runner import run_next

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATASET_MARKER = "zebra-quokka-7431"  # a dataset's contents, which no log line may hold


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    home = tmp_path_factory.mktemp("operations-home")
    with database_url("sqlite", home) as url:
        yield make_settings(home, url, inference_device="cpu", adapter_cache_bytes=64 << 20, progress_interval=0.01)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def captured_logs():
    """The service's logging, as JSON lines, into a buffer (the root logger restored after)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging("info", "json", stream=buffer)
    yield buffer
    root.handlers[:] = handlers
    root.setLevel(level)


def tenant(client, label: str) -> tuple[str, str]:
    with client.app.state.db.session() as session:
        row, key = create_tenant(session, f"{label}-{secrets.token_hex(4)}")
        return row.id, key


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_with_a_job_and_generations(client, settings, captured_logs):
    tenant_id, key = tenant(client, "metrics")
    headers = {"Authorization": f"Bearer {key}"}
    before = scrape(client)
    worker_before = samples(generate_latest(worker_metrics().registry).decode())

    file_id = upload(client, headers, dataset(16, task="add")).json()["id"]
    job = submit_job(client, headers, file_id, max_steps=3)
    queued = scrape(client)
    assert value(queued, "rlora_queue_depth", device_class="cpu") == value(before, "rlora_queue_depth", device_class="cpu") + 1
    assert value(queued, "rlora_queue_oldest_age_seconds", device_class="cpu") > 0
    assert value(queued, "rlora_jobs", status="queued") == value(before, "rlora_jobs", status="queued") + 1

    assert run_next(settings, client.app.state.db, f"{settings.queue_prefix}.cpu", "test-worker", threading.Event()) == Status.SUCCEEDED
    adapter_id = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()["adapter_id"]
    for _ in range(2):  # the first loads the adapter (a miss), the second finds it (a hit)
        response = client.post("/generate", headers=headers, json={"inputs": "3+4=", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 4}})
        assert response.status_code == 200, response.text
    after = scrape(client)

    # The jobs, from the database.
    assert value(after, "rlora_jobs", status="succeeded") == value(before, "rlora_jobs", status="succeeded") + 1
    assert value(after, "rlora_queue_depth", device_class="cpu") == value(before, "rlora_queue_depth", device_class="cpu")
    assert value(after, "rlora_database_up") == 1 and value(after, "rlora_adapters") >= 1
    # Requests by route template and status: counted, and timed.
    for route, method, status in (("/v1/jobs", "POST", "201"), ("/v1/jobs/{job_id}", "GET", "200"), ("/generate", "POST", "200")):
        labels = dict(method=method, route=route, status=status)
        assert value(after, "rlora_http_requests_total", **labels) > value(before, "rlora_http_requests_total", **labels)
        assert value(after, "rlora_http_request_duration_seconds_count", **labels) > value(before, "rlora_http_request_duration_seconds_count", **labels)
    # Generation: tokens, time to first token, batch sizes, the adapter cache, the base model.
    assert value(after, "rlora_generated_tokens_total", base_model="tiny") >= value(before, "rlora_generated_tokens_total", base_model="tiny") + 2
    assert value(after, "rlora_generation_time_to_first_token_seconds_count", base_model="tiny") == value(before, "rlora_generation_time_to_first_token_seconds_count", base_model="tiny") + 2
    assert value(after, "rlora_generation_time_to_first_token_seconds_sum", base_model="tiny") > value(before, "rlora_generation_time_to_first_token_seconds_sum", base_model="tiny")
    assert value(after, "rlora_generation_batch_size_count", base_model="tiny") > value(before, "rlora_generation_batch_size_count", base_model="tiny")
    finished = sum(v for (name, _), v in after.items() if name == "rlora_generation_requests_total")
    assert finished - sum(v for (name, _), v in before.items() if name == "rlora_generation_requests_total") == 2
    assert value(after, "rlora_adapter_cache_misses_total") == 1 and value(after, "rlora_adapter_cache_hits_total") >= 1
    assert value(after, "rlora_adapter_cache_adapters") == 1 and value(after, "rlora_adapter_cache_bytes") > 0
    assert value(after, "rlora_base_models_loaded") == 1
    # No tenant id, key or object id in any label value: routes are templates.
    labels = " ".join(label for (_, pairs) in after for _, label in pairs)
    for secret in (tenant_id, key, job["id"], adapter_id, file_id):
        assert secret not in labels

    # The worker's own registry (its metrics port): the attempt's duration, steps, heartbeats.
    worker_after = samples(generate_latest(worker_metrics().registry).decode())
    succeeded = dict(device_class="cpu", outcome="succeeded")
    assert value(worker_after, "rlora_job_duration_seconds_count", **succeeded) == value(worker_before, "rlora_job_duration_seconds_count", **succeeded) + 1
    assert value(worker_after, "rlora_job_duration_seconds_sum", **succeeded) > value(worker_before, "rlora_job_duration_seconds_sum", **succeeded)
    assert value(worker_after, "rlora_training_steps_total", device_class="cpu") == value(worker_before, "rlora_training_steps_total", device_class="cpu") + 3
    assert value(worker_after, "rlora_worker_running_jobs") == 0

    # The job's events carry its ids; the requests', the request id and the tenant.
    events = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    job_events = [e for e in events if e["logger"] == "worker.runner"]
    assert job_events and all(e["job_id"] == job["id"] and e["attempt"] == 1 and e["tenant_id"] == tenant_id for e in job_events)
    access = [e for e in events if e["logger"] == "service.access" and e.get("route") == "/v1/jobs" and e["method"] == "POST"]
    assert access and access[0]["tenant_id"] == tenant_id and access[0]["status"] == 201 and len(access[0]["request_id"]) == 32


def test_request_ids_and_no_secrets_in_the_logs(client, captured_logs):
    tenant_id, key = tenant(client, "logs")
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": "trace-42.a:b"}
    response = upload(client, headers, dataset(4, task=DATASET_MARKER))
    assert response.status_code == 201 and response.headers["X-Request-ID"] == "trace-42.a:b"
    bad_record = json.dumps({"prompt": DATASET_MARKER, "completion": 5}) + "\n"  # a 422 quoting the line
    assert upload(client, headers, bad_record).status_code == 422
    # A request id that could forge a line or flood the log is replaced by a fresh one.
    for given in ("two\nlines", "x" * 129, "sp ace", ""):
        answered = client.get("/v1/jobs", headers={**headers, "X-Request-ID": given}).headers["X-Request-ID"]
        assert answered != given and len(answered) == 32
    wrong = client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}x", "X-Request-ID": "wrong-key"})
    assert wrong.status_code == 401 and wrong.headers["X-Request-ID"] == "wrong-key"
    assert client.get("/no/such/path").status_code == 404

    text = captured_logs.getvalue()
    events = [json.loads(line) for line in text.splitlines()]  # every line one JSON event
    traced = [e for e in events if e.get("request_id") == "trace-42.a:b"]
    assert traced and all(e["tenant_id"] == tenant_id for e in traced)
    assert {(e["route"], e["status"]) for e in traced if e["logger"] == "service.access"} == {("/v1/files", 201), ("/v1/files", 422)}
    (refused,) = [e for e in events if e.get("request_id") == "wrong-key"]
    assert refused["status"] == 401 and "tenant_id" not in refused
    assert any(e.get("route") == "unmatched" and e["status"] == 404 for e in events)
    assert key not in text and key[8:] not in text and DATASET_MARKER not in text


def test_one_shot_commands_are_quiet_by_default(tmp_path):
    """`rlora tenant create` prints its key and one line for a person, nothing else (no Alembic lines); with
    --log-level info the migrations are told, as JSON lines where stderr is no terminal."""
    env = service_env(HOME=str(tmp_path))
    env["RLORA_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = str(REPO)
    quiet = subprocess.run([sys.executable, "-m", "service.cli", "tenant", "create", "quiet"], env=env, capture_output=True, text=True, cwd=REPO)
    # stdout: the key alone (KEY=$(rlora tenant create ...)); stderr: the one line for a person.
    assert quiet.returncode == 0 and quiet.stdout.startswith("rlk_") and len(quiet.stdout.splitlines()) == 1
    assert len(quiet.stderr.splitlines()) == 1 and quiet.stderr.startswith("tenant quiet ("), quiet.stderr
    told = subprocess.run([sys.executable, "-m", "service.cli", "--log-level", "debug", "migrate"], env=env, capture_output=True, text=True, cwd=REPO)
    assert told.returncode == 0, told.stderr
    events = [json.loads(line) for line in told.stderr.splitlines()]
    assert any(e["logger"].startswith("alembic") for e in events)


def test_several_api_processes_report_their_requests_together(tmp_path):
    """`rlora serve --workers 2`: whichever process answers a scrape reports every process's
    requests (prometheus_client's multiprocess mode, in a folder removed at exit); the log is
    JSON lines, one event per request, and uvicorn's own access lines are not there."""
    home, port = tmp_path / "home", free_port()
    env = service_env(HOME=str(home), INFERENCE_IN_API="false", LOG_FORMAT="json")
    env["PYTHONPATH"] = str(REPO)
    env["TMPDIR"] = str(tmp_path)  # where the command makes its metrics folder
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            rlora_command("serve", "--no-worker", "--workers", "2", "--port", str(port)), env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_answering(f"{base}/health", process, log_path)
        for _ in range(12):
            with httpx.Client() as fresh:  # a connection each, so both processes answer some
                assert fresh.get(f"{base}/v1/models").status_code == 401
        for _ in range(4):  # every scrape, whichever process answers it, sees all twelve
            with httpx.Client() as fresh:
                metrics = samples(fresh.get(f"{base}/metrics").text)
            assert value(metrics, "rlora_http_requests_total", method="GET", route="/v1/models", status="401") == 12
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("rlora-metrics-")]
    finally:
        stop_process(process, timeout=30)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("rlora-metrics-")], "the metrics folder is removed"
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    refused = [e for e in events if e["logger"] == "service.access" and e["route"] == "/v1/models"]
    assert len(refused) == 12 and len({e["request_id"] for e in refused}) == 12
    assert not [e for e in events if e["logger"] == "uvicorn.access"]


def test_running_jobs_and_their_heartbeats_by_device_class(queue_client):
    """On SQLite and PostgreSQL: a claimed job counts as running on its class, and the age of
    its last heartbeat grows until its worker beats again (what an alert on stuck workers reads)."""
    from datetime import timedelta

    from sqlalchemy import update

    from service.jobs import states
    from service.models import Job, utcnow

    (job_id,) = queued_jobs(queue_client, tenant_headers(queue_client), 1)
    waiting = scrape(queue_client)
    assert value(waiting, "rlora_queue_depth", device_class="cpu") == 1 and value(waiting, "rlora_running_jobs", device_class="cpu") == 0
    with queue_client.app.state.db.session() as session:
        states.claim(session, job_id, "a-worker")
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=90)))
        session.commit()
    running = scrape(queue_client)
    assert value(running, "rlora_queue_depth", device_class="cpu") == 0 and value(running, "rlora_running_jobs", device_class="cpu") == 1
    assert 90 <= value(running, "rlora_running_oldest_heartbeat_age_seconds", device_class="cpu") < 120
    assert value(running, "rlora_running_jobs", device_class="gpu") == 0
