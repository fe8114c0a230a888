"""Shared fixtures of the service, worker and migration tests.

Test modules import what they use from here. The databases are real: a SQLite file and a
fresh PostgreSQL database on 127.0.0.1 per test session, dropped afterwards. Every test
makes its own tenants, and every query is tenant-scoped, so tests share one database.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

POSTGRES_ADMIN_URL = os.environ.get("RLORA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("RLORA_TEST_REDIS", "redis://127.0.0.1:6379")
REPO = Path(__file__).resolve().parent.parent
BACKENDS = ["sqlite", "postgresql"]


# Services the tests found nobody listening at, by name: each skips its tests with this
# reason, and the session ends with one line per service (pytest_terminal_summary).
_UNREACHABLE: dict[str, str] = {}


@functools.cache
def _unreachable(name: str, url: str, default_port: int) -> str | None:
    """Why nothing listens at ``url``'s host and port (None: something does). Only a server
    that is not there skips its tests; one that is there but refuses us fails them."""
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or default_port)
    try:
        socket.create_connection(address, timeout=3).close()
    except OSError as err:
        _UNREACHABLE[name] = f"{name} at {address[0]}:{address[1]} is not reachable ({err.strerror or err})"
        return _UNREACHABLE[name]
    return None


def require_postgres() -> None:
    """Skips the calling test when no PostgreSQL listens at ``POSTGRES_ADMIN_URL``."""
    reason = _unreachable("PostgreSQL", POSTGRES_ADMIN_URL, 5432)
    if reason:
        pytest.skip(reason)


def require_redis() -> str:
    """``REDIS_URL``; skips the calling test when no Redis listens there."""
    reason = _unreachable("Redis", REDIS_URL, 6379)
    if reason:
        pytest.skip(reason)
    return REDIS_URL


def pytest_terminal_summary(terminalreporter) -> None:
    for name, reason in _UNREACHABLE.items():
        skipped = sum(reason in str(report.longrepr) for report in terminalreporter.stats.get("skipped", []))
        terminalreporter.write_line(
            f"{reason}: {skipped} test(s) needing it skipped; scripts/start-services starts it "
            f"(README: what the tests need)"
        )


@contextmanager
def fresh_postgres_database():
    """A new, empty PostgreSQL database (its SQLAlchemy URL), dropped on exit."""
    import psycopg
    from sqlalchemy.engine import make_url

    require_postgres()
    name = f"rlora_test_{secrets.token_hex(6)}"
    admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database_url(backend: str, folder: Path):
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'rlora.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


def make_settings(home: Path, url: str, **overrides):
    from service.settings import Settings

    values = dict(home=home, database_url=url, max_upload_bytes=64 * 1024, max_active_jobs_per_tenant=20)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def service_settings(backend, tmp_path_factory):
    home = tmp_path_factory.mktemp(f"home-{backend}")
    with database_url(backend, home) as url:
        yield make_settings(home, url)


@pytest.fixture(scope="session")
def app(service_settings):
    from service.api.app import create_app

    return create_app(service_settings)


@pytest.fixture(scope="session")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def new_tenant(app):
    """Makes a tenant with a unique name; returns its Authorization headers."""
    from service.api.auth import create_tenant

    def make(label: str = "t") -> dict[str, str]:
        with app.state.db.session() as session:
            _, key = create_tenant(session, f"{label}-{secrets.token_hex(4)}")
        return {"Authorization": f"Bearer {key}"}

    return make


def dataset(n: int = 12, task: str | None = None, start: int = 0) -> str:
    """A valid JSONL dataset of ``n`` tiny prompt/completion records."""
    lines = []
    for i in range(start, start + n):
        record = {"prompt": f"{i}+1=", "completion": str(i + 1)}
        if task:
            record["task"] = task
        lines.append(json.dumps(record))
    return "\n".join(lines) + "\n"


def upload(client, headers, content: str | bytes, name: str = "data.jsonl"):
    return client.post("/v1/files", headers=headers, files={"file": (name, content)})


def tiny_training(**overrides) -> dict:
    """Training settings small enough for a 2-core test machine."""
    values = dict(max_steps=4, batch_size=2, max_seq_len=64, checkpoint_every=2, eval_max_examples=2, eval_max_new_tokens=2, device="cpu")
    values.update(overrides)
    return values


def job_body(file_id: str, **training) -> dict:
    return {
        "base_model": "tiny",
        "mixture": [{"file_id": file_id, "weight": 1.0, "task": "add"}],
        "adapter": {"method": "rlora", "heads": 2, "rank": 2, "target_modules": ["gate_proj"]},
        "training": tiny_training(**training),
    }


def submit_job(client, headers, file_id: str, **training) -> dict:
    """A queued job of ``job_body`` (its JSON), asserting the submission was accepted."""
    response = client.post("/v1/jobs", headers=headers, json=job_body(file_id, **training))
    assert response.status_code == 201, response.text
    return response.json()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; that value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@contextmanager
def served_in_thread(app):
    """``app`` served by uvicorn in a thread of this process on a free port: its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30, message="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until_answering(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail with the end of the log if ``process`` exits first."""

    def answering():
        assert process.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answering, timeout, 0.2, f"{url} to answer")


def rlora_command(*args: str) -> list[str]:
    """The ``rlora`` console script installed beside this interpreter (in .venv under make),
    or the module it points at; never another environment's ``rlora`` that PATH finds first."""
    script = Path(sys.executable).with_name("rlora")
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "service.cli", *args]


def cli_tenant_key(home: Path, name: str) -> str:
    """A new tenant made with ``rlora tenant create`` on the service at ``home``: its API key."""
    result = subprocess.run(rlora_command("tenant", "create", name), cwd=REPO, env=service_env(home=home), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def service_env(**settings) -> dict[str, str]:
    """This environment without any RLORA_* setting, plus ``settings`` as RLORA_<NAME>."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLORA_")}
    env.update({f"RLORA_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
