"""End to end: ``rlora serve`` on the embedded default (SQLite, filesystem broker, one worker)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import httpx
import pytest
from conftest_service import REPO, cli_tenant_key, dataset, free_port, job_body, rlora_command, service_env, stop_process, wait_for


def test_serve_trains_a_job_for_one_tenant_and_hides_it_from_another(tmp_path, tiny_model_path):
    home = tmp_path / "home"
    shutil.copytree(tiny_model_path, home / "models" / "tiny")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        rlora_command("serve", "--port", str(port)), cwd=REPO, env=service_env(home=home, progress_interval=0.2),
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()
                return False

        wait_for(healthy, 60, 0.3, "rlora serve to answer /health")
        alice = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {cli_tenant_key(home, 'alice')}"}, timeout=30)
        bob = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {cli_tenant_key(home, 'bob')}"}, timeout=30)
        again = subprocess.run(rlora_command("tenant", "create", "alice"), cwd=REPO, env=service_env(home=home), capture_output=True, text=True)
        assert again.returncode == 1 and "exists" in again.stderr

        file = alice.post("/v1/files", files={"file": ("add.jsonl", dataset(20))}).json()
        job = alice.post("/v1/jobs", json=job_body(file["id"], max_steps=3), headers={"Idempotency-Key": "first"}).json()
        assert job["status"] == "queued"

        def finished():
            current = alice.get(f"/v1/jobs/{job['id']}").json()
            return current["status"] in ("succeeded", "failed", "cancelled") and current

        done = wait_for(finished, 180, 0.5, "the job to finish")
        assert done["status"] == "succeeded", (done, (tmp_path / "serve.log").read_text()[-4000:])
        adapters = alice.get("/v1/adapters").json()["data"]
        assert [a["id"] for a in adapters] == [done["adapter_id"]]

        for path in ("/v1/files", "/v1/jobs", "/v1/adapters"):
            assert bob.get(path).json()["data"] == []
        for path in (f"/v1/files/{file['id']}", f"/v1/jobs/{job['id']}", f"/v1/adapters/{done['adapter_id']}"):
            assert bob.get(path).status_code == 404
        workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True, text=True).stdout.split()]
        assert len(workers) == 1, "one embedded worker"
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(30)
        finally:
            stop_process(serve)
    assert serve.returncode == 0
    # The embedded worker went down with the server.
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
