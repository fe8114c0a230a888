"""Stopping ``rlora serve`` (SIGTERM, as systemd and Ctrl-C do) while its worker trains: the
job goes back to the queue, never failed, and the next start finishes it from its checkpoint."""

from __future__ import annotations

import shutil
import signal
import subprocess

import httpx
from conftest_service import REPO, cli_tenant_key, dataset, free_port, job_body, rlora_command, service_env, stop_process, wait_for


def start_serve(home, port: int, log_path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        serve = subprocess.Popen(
            rlora_command("serve", "--port", str(port)), cwd=REPO, env=service_env(home=home, progress_interval=0.2),
            stdout=log, stderr=subprocess.STDOUT,
        )

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            assert serve.poll() is None, log_path.read_text()
            return False

    wait_for(healthy, 60, 0.3, "rlora serve to answer /health")
    return serve


def test_stopping_serve_gives_the_running_job_back_and_the_next_start_finishes_it(tmp_path, tiny_model_path):
    home, port, log_path = tmp_path / "home", free_port(), tmp_path / "serve.log"
    shutil.copytree(tiny_model_path, home / "models" / "tiny")
    serve = start_serve(home, port, log_path)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {cli_tenant_key(home, 'a')}"}, timeout=30)
        file_id = client.post("/v1/files", files={"file": ("add.jsonl", dataset(40))}).json()["id"]
        job_id = client.post("/v1/jobs", json=job_body(file_id, max_steps=400, checkpoint_every=2)).json()["id"]
        wait_for(lambda: (client.get(f"/v1/jobs/{job_id}").json()["progress"] or {}).get("step", 0) >= 3, 180, 0.05, "training")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(90) == 0
    finally:
        stop_process(serve)

    serve = start_serve(home, port, log_path)
    try:
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        requeued = [e["data"] for e in events if e["kind"] == "requeued"]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert requeued == [{"status": "queued", "reason": "the worker shut down"}], (job["status"], events, log_path.read_text()[-4000:])
        done = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed", "cancelled") and j,
                        180, 0.5, "the job to finish")
        assert done["status"] == "succeeded" and done["attempt"] == 2, (done, log_path.read_text()[-4000:])
        assert "NotImplementedError" not in log_path.read_text()
    finally:
        stop_process(serve, timeout=90)
