"""Hardening: security headers on every response, streams included and not buffered; the data
under RLORA_HOME private to the service's user (folders 0700, files 0600)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import anyio
import httpx
import pytest
from conftest_service import (
    REPO, database_url, dataset, free_port, job_body, make_settings, rlora_command, service_env, stop_process, wait_for,
    wait_until_answering,
)
from fastapi.testclient import TestClient

from service.api.security_headers import SECURITY_HEADERS, SecurityHeadersMiddleware


def assert_secured(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.request.url.path, response.status_code, name)


@pytest.fixture(scope="module")
def generating_client(tmp_path_factory, tiny_model_path):
    """An app on SQLite whose engine generates on the CPU with the tiny base model."""
    from service.api.app import create_app

    home = tmp_path_factory.mktemp("hardening-home")
    shutil.copytree(tiny_model_path, home / "models" / "tiny")
    with database_url("sqlite", home) as url:
        with TestClient(create_app(make_settings(home, url, inference_device="cpu"))) as client:
            yield client


@pytest.fixture
def tenant(generating_client) -> dict[str, str]:
    from service.api.auth import create_tenant

    with generating_client.app.state.db.session() as session:
        _, key = create_tenant(session, f"h-{os.urandom(4).hex()}")
    return {"Authorization": f"Bearer {key}"}


def test_json_answers_and_errors_carry_the_security_headers(generating_client, tenant):
    client = generating_client
    for response in (
        client.get("/v1/files", headers=tenant),  # JSON with a tenant's data
        client.get("/health"),
        client.get("/v1/files"),  # 401
        client.get("/v1/files/file-missing", headers=tenant),  # 404 of a route
        client.get("/no/such/path"),  # 404 of no route
        client.post("/v1/jobs", headers=tenant, json={"base_model": 1}),  # 422
        client.post("/v1/jobs", headers={**tenant, "Content-Length": str(1 << 30)}, content=b"{}"),  # 413 of the body limit
        client.get("/docs"),
        client.get("/openapi.json"),
    ):
        assert_secured(response)
    assert [client.get(path).status_code for path in ("/v1/files", "/no/such/path", "/docs")] == [401, 404, 200]


def test_an_unhandled_error_carries_the_security_headers(tmp_path):
    from service.api.app import create_app

    with database_url("sqlite", tmp_path) as url:
        app = create_app(make_settings(tmp_path, url))

    @app.get("/boom")
    def boom():
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert_secured(response)


def test_a_token_stream_carries_the_security_headers(generating_client, tenant):
    request = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "ignore_eos_token": True}}
    with generating_client.stream("POST", "/generate_stream", headers=tenant, json=request) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert_secured(response)  # no-store in place of the stream's own no-cache
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert len(events) == 4


def test_the_middleware_passes_each_part_of_a_stream_on_at_once():
    """A part reaches the client before the application sends the next one (nothing buffered)."""
    sent: list[dict] = []
    first_part_out = anyio.Event()
    proceed = anyio.Event()

    async def streaming_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await proceed.wait()
        await send({"type": "http.response.body", "body": b"data: 2\n\n"})

    async def send(message):
        sent.append(message)
        if message.get("more_body"):
            first_part_out.set()

    async def main():
        async with anyio.create_task_group() as group:
            group.start_soon(SecurityHeadersMiddleware(streaming_app), {"type": "http", "path": "/"}, None, send)
            with anyio.fail_after(5):
                await first_part_out.wait()
            assert len(sent) == 2  # the start and the first part, while the app waits
            proceed.set()

    anyio.run(main)
    headers = dict(sent[0]["headers"])
    assert headers[b"cache-control"] == b"no-store" and headers[b"x-content-type-options"] == b"nosniff"
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n"]


def private(path) -> bool:
    """Nobody but the owner may read, write or enter it."""
    return stat.S_IMODE(os.lstat(path).st_mode) & 0o077 == 0


def test_rlora_serve_keeps_everything_under_its_home_private(tmp_path):
    """End to end on the embedded default (SQLite), started with a permissive umask: the home,
    the database and its WAL, a stored upload and an adapter folder are 0700 / 0600."""
    home = tmp_path / "home"  # made by the service; it builds the tiny model there too
    env = service_env(home=home, progress_interval=0.2)

    def permissive():
        os.umask(0o022)

    made = subprocess.run(rlora_command("tenant", "create", "alice"), cwd=REPO, env=env, capture_output=True, text=True, timeout=120, preexec_fn=permissive)
    assert made.returncode == 0, made.stderr
    headers = {"Authorization": f"Bearer {made.stdout.splitlines()[-1]}"}
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            rlora_command("serve", "--port", str(port)), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=permissive,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_answering(f"{base}/health", serve, tmp_path / "serve.log")
        api = httpx.Client(base_url=base, headers=headers, timeout=30)
        file = api.post("/v1/files", files={"file": ("add.jsonl", dataset(12))}).json()
        job = api.post("/v1/jobs", json=job_body(file["id"], max_steps=2)).json()

        def finished():
            current = api.get(f"/v1/jobs/{job['id']}").json()
            return current["status"] in ("succeeded", "failed", "cancelled") and current

        done = wait_for(finished, 240, 0.5, "the job to finish")
        assert done["status"] == "succeeded", (done, (tmp_path / "serve.log").read_text()[-3000:])
        adapter = api.get(f"/v1/adapters/{done['adapter_id']}").json()
        wal = home / "rlora.db-wal"
        assert wal.exists(), "the database is in WAL mode while the service runs"
        stored = home / "files" / file["sha256"][:2] / file["sha256"]
        adapters = [path for path in (home / "jobs").rglob("adapter_config.json")]
        assert adapter["id"] and stored.is_file() and adapters
        for path in (home, home / "rlora.db", wal, stored, stored.parent, adapters[0].parent, adapters[0]):
            assert private(path), f"{path}: {oct(stat.S_IMODE(os.lstat(path).st_mode))}"
        # And everything else the service made there: the broker's messages, checkpoints, the model.
        loose = [f"{p}: {oct(stat.S_IMODE(p.lstat().st_mode))}" for p in home.rglob("*") if not p.is_symlink() and not private(p)]
        assert loose == []
    finally:
        stop_process(serve, 30)
