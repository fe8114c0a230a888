"""The API under load and faults: more connections than threads, slow and stalled bodies, an
exhausted pool, a broker that is down, staging files left by a killed upload.

The load tests run ``rlora serve --no-worker`` as a subprocess (a real server, real sockets) on
SQLite and PostgreSQL; the pool and readiness tests use the app in-process.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from conftest_service import (
    BACKENDS,
    REPO,
    database_url,
    dataset,
    free_port,
    make_settings,
    rlora_command,
    service_env,
    stop_process,
    submit_job,
    upload,
    wait_for,
    wait_until_answering,
)
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import create_tenant
from service.db import POOL_OVERFLOW, Database


@contextmanager
def served(tmp_path, url: str, *arguments: str, **settings):
    """``rlora serve --no-worker *arguments`` on a free port with these settings, once it is
    ready: its base URL, process, RLORA_HOME and log."""
    port = free_port()
    home = tmp_path / "home"
    log_path = tmp_path / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            rlora_command("serve", "--no-worker", "--port", str(port), *arguments), cwd=REPO,
            env=service_env(home=home, database_url=url, **settings), stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{base}/ready", process, log_path)
        yield base, process, home, log_path
    finally:
        stop_process(process)


def new_key(url: str) -> str:
    db = Database(url)
    try:
        with db.session() as session:
            return create_tenant(session, f"load-{secrets.token_hex(4)}")[1]
    finally:
        db.dispose()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- more connections than threads --------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_more_concurrent_requests_than_threads_are_all_answered(tmp_path, backend_name):
    """120 authorised requests at once on 4 threads (and a pool of 4 + overflow): every one is
    answered 200, and /health answers quickly throughout (before the fix: a deadlock)."""
    with database_url(backend_name, tmp_path) as url, served(tmp_path, url, api_threads=4) as (base, *_):
        key = new_key(url)
        with httpx.Client(base_url=base, headers=bearer(key), timeout=30) as client:
            file_id = client.post("/v1/files", files={"file": ("d.jsonl", dataset(4, task="add"))}).json()["id"]
            job_id = submit_job(client, {}, file_id)["id"]

        async def load() -> tuple[list[int], float]:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(base_url=base, headers=bearer(key), timeout=60, limits=limits) as client:
                paths = [f"/v1/jobs/{job_id}", "/v1/files", f"/v1/files/{file_id}", "/v1/jobs?limit=5"]
                requests = [client.get(paths[i % len(paths)]) for i in range(120)]
                done = asyncio.Event()

                async def health_while_loaded() -> float:
                    slowest = 0.0
                    async with httpx.AsyncClient(base_url=base, timeout=30) as probe:
                        while not done.is_set():
                            start = time.monotonic()
                            assert (await probe.get("/health")).status_code == 200
                            slowest = max(slowest, time.monotonic() - start)
                            await asyncio.sleep(0.05)
                    return slowest

                prober = asyncio.create_task(health_while_loaded())
                responses = await asyncio.wait_for(asyncio.gather(*requests), 90)
                done.set()
                return [r.status_code for r in responses], await prober

        statuses, slowest_health = asyncio.run(load())
        assert statuses == [200] * 120
        assert slowest_health < 5, f"/health took {slowest_health:.1f}s under load"


# --- slow and stalled bodies -------------------------------------------------------------------


def _raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """The server's answer, until it closes the connection (as it does after a 408). A client
    whose bytes the server did not read may see a reset (after the status line, at least)."""
    sock.settimeout(30)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        assert chunks, "reset before any answer"
    return b"".join(chunks)


def _trickle_until_answered(socks: list[socket.socket], interval: float, timeout: float) -> list[bytes]:
    """Send each socket one byte per ``interval`` until the server answers it; the answers."""
    answers: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + timeout
    while len(answers) < len(socks):
        assert time.monotonic() < deadline, "not every trickling request was answered"
        waiting = [sock for sock in socks if sock not in answers]
        readable, _, _ = select.select(waiting, [], [], interval)
        for sock in readable:
            answers[sock] = _answer(sock)
        for sock in waiting:
            if sock not in answers:
                try:
                    sock.sendall(b"x")
                except OSError:
                    pass
    return [answers[sock] for sock in socks]


def test_slow_and_stalled_bodies_get_408_while_another_tenant_is_served(tmp_path):
    idle = 2.0
    with database_url("sqlite", tmp_path) as url, served(
        tmp_path, url, api_threads=2, body_idle_timeout=idle, body_min_rate=200
    ) as (base, _, home, _log):
        port = int(base.rsplit(":", 1)[1])
        trickler, other = new_key(url), new_key(url)
        boundary = "b0undary"
        upload_head = (
            f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {trickler}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'
        ).encode()
        json_head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {trickler}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
        ).encode()
        # Eight trickling uploads and four trickling JSON bodies (a byte each 0.5 s, under the
        # minimum rate), and two of each that stop sending: more than the server's threads.
        tricklers = [_raw_request(port, upload_head) for _ in range(8)] + [_raw_request(port, json_head) for _ in range(4)]
        stalled = [_raw_request(port, upload_head), _raw_request(port, upload_head), _raw_request(port, json_head), _raw_request(port, json_head)]
        with ExitStack() as stack, ThreadPoolExecutor(1) as pool:
            for sock in tricklers + stalled:
                stack.callback(sock.close)
            trickled = pool.submit(_trickle_until_answered, tricklers, 0.5, 30)
            # Meanwhile another tenant is served at once.
            with httpx.Client(base_url=base, headers=bearer(other), timeout=10) as client:
                for _ in range(5):
                    start = time.monotonic()
                    assert client.get("/v1/files").status_code == 200
                    assert time.monotonic() - start < 2
                    time.sleep(0.2)
            answers = trickled.result()
            assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers
            bodies = [answer.partition(b"\r\n\r\n")[2] for answer in answers]
            assert all(b"request_timeout" in body and b"bytes/s" in body for body in bodies if body), bodies
            assert sum(1 for body in bodies if body) >= len(bodies) // 2, "most answers arrive whole"
            for sock in stalled:
                answer = _answer(sock)
                assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
                assert f"for {idle:g} s".encode() in answer
        # The timed-out uploads left no staging file behind.
        wait_for(lambda: not list((home / "tmp").iterdir()), 10, 0.2, "the staging files to go")
        # A body that arrives at a normal pace is unaffected.
        with httpx.Client(base_url=base, headers=bearer(other), timeout=30) as client:
            assert upload(client, {}, dataset(4)).status_code == 201


# --- an exhausted pool -------------------------------------------------------------------------


def test_an_exhausted_pool_is_503_with_retry_after_not_a_hang(tmp_path):
    with database_url("sqlite", tmp_path) as url:
        settings = make_settings(tmp_path / "home", url, api_threads=1, database_pool_timeout=0.5)
        app = create_app(settings)
        with TestClient(app) as client:
            with app.state.db.session() as session:
                _, key = create_tenant(session, "pool")
            assert client.get("/v1/files", headers=bearer(key)).status_code == 200
            # Every connection the pool may open (1 + overflow) is held elsewhere.
            held = [app.state.db.engine.connect() for _ in range(1 + POOL_OVERFLOW)]
            try:
                start = time.monotonic()
                response = client.get("/v1/files", headers=bearer(key))
                assert time.monotonic() - start < 5
                assert response.status_code == 503 and response.headers["retry-after"]
                assert response.json()["error"]["code"] == "unavailable"
                assert client.get("/health").status_code == 200
            finally:
                for connection in held:
                    connection.close()
            assert client.get("/v1/files", headers=bearer(key)).status_code == 200


# --- readiness ---------------------------------------------------------------------------------


def _closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


def test_ready_checks_the_database_and_the_broker(tmp_path):
    from conftest_service import require_redis

    redis_url = require_redis()
    with database_url("sqlite", tmp_path) as url:
        reachable = make_settings(tmp_path / "a", url, broker_url=f"{redis_url}/0")
        with TestClient(create_app(reachable)) as client:
            response = client.get("/ready")
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}

        down = make_settings(tmp_path / "b", url, broker_url=f"redis://127.0.0.1:{_closed_port()}/0", ready_timeout=2)
        with TestClient(create_app(down)) as client:
            start = time.monotonic()
            response = client.get("/ready")
            assert time.monotonic() - start < 10
            assert response.status_code == 503 and response.headers["retry-after"]
            error = response.json()["error"]
            assert error["code"] == "not_ready" and "broker" in error["message"]
            assert [d["component"] for d in error["details"]] == ["broker"]
            assert client.get("/health").status_code == 200  # alive all the same

        embedded = make_settings(tmp_path / "c", url)
        app = create_app(embedded)
        with TestClient(app) as client:
            assert client.get("/ready").status_code == 200
            folder = app.state.celery.conf.broker_transport_options["data_folder_in"]
            os.rename(folder, folder + ".gone")
            response = client.get("/ready")
            assert response.status_code == 503 and "broker" in response.json()["error"]["message"]


# --- staging swept on start ---------------------------------------------------------------------


def test_staging_files_older_than_the_limit_are_swept_at_start(tmp_path):
    with database_url("sqlite", tmp_path) as url:
        settings = make_settings(tmp_path / "home", url, staging_max_age=3600)
        settings.tmp_dir.mkdir(parents=True)
        old, young = settings.tmp_dir / "upload-old", settings.tmp_dir / "upload-young"
        old.write_bytes(b"left by a killed upload")
        young.write_bytes(b"another process is writing this one")
        two_hours_ago = time.time() - 7200
        os.utime(old, (two_hours_ago, two_hours_ago))
        with TestClient(create_app(settings)):
            assert not old.exists() and young.exists()


def test_a_killed_upload_leaves_no_staging_file_after_the_next_start(tmp_path):
    with database_url("sqlite", tmp_path) as url:
        with served(tmp_path, url) as (base, process, home, _log):
            key = new_key(url)
            port = int(base.rsplit(":", 1)[1])
            head = (
                f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 60000\r\n\r\n"
                '--b\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'
            ).encode()
            sock = _raw_request(port, head + dataset(100).encode())
            try:
                staged = wait_for(lambda: list((home / "tmp").glob("upload-*")), 30, 0.1, "the upload to be staged")
                process.send_signal(signal.SIGKILL)  # mid-body: nothing in-process cleans up
                process.wait(30)
            finally:
                sock.close()
            assert all(path.exists() for path in staged)
        time.sleep(1.5)  # older than the limit below
        with served(tmp_path, url, staging_max_age=1):
            assert not any(path.exists() for path in staged)


# --- several API processes ---------------------------------------------------------------------


def test_serve_runs_several_processes_only_without_an_engine_in_them(tmp_path):
    with database_url("sqlite", tmp_path) as url:
        refused = subprocess.run(
            rlora_command("serve", "--no-worker", "--workers", "2", "--port", str(free_port())), cwd=REPO,
            env=service_env(home=tmp_path / "home", database_url=url), capture_output=True, text=True, timeout=120,
        )
        assert refused.returncode == 2
        assert "RLORA_ENGINE_URLS" in refused.stderr and "RLORA_INFERENCE_IN_API=false" in refused.stderr

        # Forwarding generation to engine processes: here none answers, and each process says so.
        engine_url = f"http://127.0.0.1:{free_port()}"
        with served(tmp_path, url, "--workers", "2", engine_urls=engine_url) as (base, _, _home, _log):
            with httpx.Client(base_url=base, headers=bearer(new_key(url)), timeout=30) as client:
                for _ in range(4):
                    response = client.post("/generate", json={"inputs": "hi"})
                    assert response.status_code == 503 and response.json()["code"] == "engine_unavailable"  # TGI's shape
                    assert engine_url in response.json()["error"]

        with served(tmp_path, url, "--workers", "2", inference_in_api="false") as (base, _, _home, log_path):
            key = new_key(url)
            with httpx.Client(base_url=base, headers=bearer(key), timeout=30) as client:
                assert all(client.get("/v1/files").status_code == 200 for _ in range(20))
                response = client.post("/generate", json={"inputs": "hi"})
                assert response.status_code == 503 and response.json()["code"] == "generation_not_served"
            # Two API processes, started by uvicorn's supervisor.
            log = log_path.read_text()
            assert log.count("Started server process") == 2, log[-3000:]
