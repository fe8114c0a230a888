"""Latency of the REST API under concurrency: job submission and status reads.

Starts ``rlora serve --no-worker`` as a subprocess on a free port of 127.0.0.1, against a
fresh PostgreSQL database that this script creates and drops (or ``--database sqlite``: the
embedded default under a temporary RLORA_HOME). The broker is the embedded (filesystem) one
and no worker runs, so submitted jobs just stay queued. Each of ``--clients`` concurrent
clients is its own tenant with its own key and dataset, and sends ``--requests`` requests per
phase:

    health   GET  /health            the baseline: routing, one session, SELECT 1
    submit   POST /v1/jobs           full validation, 4 inserts, enqueue
    status   GET  /v1/jobs/{id}      one of the client's own jobs

and the table gives p50/p99 of each, and each as a ratio to the health baseline measured in
the same run (ratios travel between machines better than milliseconds). The client imports
no torch (the server does, to validate adapter settings).

    python benchmarks/bench_api.py                      # PostgreSQL on 127.0.0.1:5432
    python benchmarks/bench_api.py --database sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get("RLORA_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


# --- set-up -------------------------------------------------------------------------------


@contextmanager
def fresh_postgres_database(admin_url: str):
    """A new PostgreSQL database (its SQLAlchemy URL) and its server version; dropped on exit."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"rlora_bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
            yield url.render_as_string(hide_password=False), f"PostgreSQL {version.split()[0]}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rlora_command(*args: str) -> list[str]:
    script = shutil.which("rlora")
    return [script, *args] if script else [sys.executable, "-m", "service.cli", *args]


def wait_healthy(base: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"rlora serve exited with {process.returncode}; see its log")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"rlora serve did not answer /health within {timeout:.0f}s")


def make_tenants(url: str, count: int) -> list[str]:
    """``count`` tenants straight in the database (the API has no route for it): their keys."""
    from service.api.auth import create_tenant
    from service.db import Database

    db = Database(url)
    try:
        keys = []
        for i in range(count):
            with db.session() as session:
                keys.append(create_tenant(session, f"bench-{i}-{secrets.token_hex(3)}")[1])
        return keys
    finally:
        db.dispose()


def dataset(n: int = 16) -> str:
    return "".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1), "task": "add"}) + "\n" for i in range(n))


def job_body(file_id: str) -> dict:
    return {
        "base_model": "tiny",
        "mixture": [{"file_id": file_id, "weight": 1.0, "task": "add"}],
        "adapter": {"method": "rlora", "heads": 3, "rank": 4},
        "training": {"max_steps": 100, "device": "cpu"},
    }


# --- load ---------------------------------------------------------------------------------


class Phase:
    def __init__(self, name: str):
        self.name = name
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.wall = 0.0
        self.timed_out = False

    def quantile(self, q: float) -> float:
        values = sorted(self.latencies)
        if not values:
            return float("nan")
        # Nearest rank: the smallest value with at least q of the samples at or below it.
        rank = max(1, -(-int(q * 1000) * len(values) // 1000))
        return values[min(rank, len(values)) - 1]


async def run_phase(name: str, clients: list[httpx.AsyncClient], requests: int, make_request, time_limit: float, on_ok=None) -> Phase:
    """Every client sends ``requests`` requests one after the other; all clients at once.

    ``make_request(client_index, n)`` gives (method, path, httpx kwargs, expected status);
    ``on_ok(client_index, response)`` sees each expected answer (outside the timing).
    """
    phase = Phase(name)

    async def one_client(index: int, client: httpx.AsyncClient) -> None:
        for n in range(requests):
            method, path, kwargs, expected = make_request(index, n)
            start = time.perf_counter()
            try:
                response = await client.request(method, path, **kwargs)
                elapsed = time.perf_counter() - start
                if response.status_code == expected:
                    phase.latencies.append(elapsed)
                    if on_ok is not None:
                        on_ok(index, response)
                else:
                    key = str(response.status_code)
                    phase.errors[key] = phase.errors.get(key, 0) + 1
            except httpx.HTTPError as err:
                key = type(err).__name__
                phase.errors[key] = phase.errors.get(key, 0) + 1

    start = time.perf_counter()
    tasks = [asyncio.create_task(one_client(i, c)) for i, c in enumerate(clients)]
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    if pending:
        phase.timed_out = True
        await asyncio.gather(*pending, return_exceptions=True)
    phase.wall = time.perf_counter() - start
    return phase


async def load(base: str, keys: list[str], requests: int, phase_limit: float) -> list[Phase]:
    job_ids: list[list[str]] = [[] for _ in keys]
    # One connection per client, kept alive: the numbers are the server's, not TCP set-up.
    clients = [
        httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=httpx.Limits(max_connections=1))
        for key in keys
    ]
    try:
        # Each tenant's dataset (not timed).
        uploads = await asyncio.gather(*(c.post("/v1/files", files={"file": ("d.jsonl", dataset())}) for c in clients))
        for response in uploads:
            response.raise_for_status()
        file_ids = [r.json()["id"] for r in uploads]

        health = lambda i, n: ("GET", "/health", {}, 200)  # noqa: E731
        submit = lambda i, n: ("POST", "/v1/jobs", {"json": job_body(file_ids[i])}, 201)  # noqa: E731

        def status(i: int, n: int):
            ids = job_ids[i]
            return "GET", f"/v1/jobs/{ids[n % len(ids)] if ids else 'missing'}", {}, 200

        # Warm-up (not reported): connections open, code paths and pools warm.
        await run_phase("warm-up", clients, 2, health, phase_limit)
        await run_phase("warm-up", clients, 1, lambda i, n: ("GET", "/v1/jobs?limit=1", {}, 200), phase_limit)
        phases = [await run_phase("health", clients, requests, health, phase_limit)]
        phases.append(await run_phase("submit", clients, requests, submit, phase_limit, lambda i, r: job_ids[i].append(r.json()["id"])))
        phases.append(await run_phase("status", clients, requests, status, phase_limit))
        return phases
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


# --- report -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def report(phases: list[Phase], args, database: str, clients: int) -> str:
    base = next(p for p in phases if p.name == "health")
    b50, b99 = base.quantile(0.5), base.quantile(0.99)
    routes = {"health": "GET /health (baseline)", "submit": "POST /v1/jobs", "status": "GET /v1/jobs/{id}"}
    lines = [
        f"API latency, {clients} concurrent clients x {args.requests} requests per phase, "
        f"`rlora serve --no-worker` (one uvicorn process), embedded broker, {database}",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores (load generator on the same machine); "
        f"Python {platform.python_version()}; torch-free client; load average before the run {args.load_before:.2f}",
        f"- command: `python benchmarks/bench_api.py --database {args.database} --clients {args.clients} --requests {args.requests}`",
        "",
        "| request | ok | errors | p50 ms | p99 ms | req/s | p50 / health p50 | p99 / health p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(p.errors.items())) or "0"
        if p.timed_out:
            errors += " (phase timed out)"
        p50, p99 = p.quantile(0.5), p.quantile(0.99)
        lines.append(
            f"| {routes[p.name]} | {len(p.latencies)} | {errors} | {p50 * 1000:.1f} | {p99 * 1000:.1f} | "
            f"{len(p.latencies) / p.wall:.0f} | {p50 / b50:.1f}x | {p99 / b99:.1f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="per client and phase")
    parser.add_argument("--phase-limit", type=float, default=30.0, help="seconds; a phase still running is cut off")
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was

    home = Path(tempfile.mkdtemp(prefix="rlora-bench-"))
    try:
        if args.database == "postgresql":
            with fresh_postgres_database(args.postgres_admin_url) as (url, name):
                return bench(args, home, url, name)
        return bench(args, home, f"sqlite:///{home / 'rlora.db'}", "SQLite (WAL)")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def bench(args, home: Path, url: str, database: str) -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLORA_")}
    env.update(RLORA_HOME=str(home), RLORA_DATABASE_URL=url, RLORA_MAX_ACTIVE_JOBS_PER_TENANT=str(10 * args.requests + 10))
    log = open(home / "serve.log", "w")
    process = subprocess.Popen(
        rlora_command("serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)),
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(base, process, timeout=90)
        keys = make_tenants(url, args.clients)
        phases = asyncio.run(load(base, keys, args.requests, args.phase_limit))
    except BaseException:
        log.flush()
        print((home / "serve.log").read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    print(report(phases, args, database, args.clients))
    bad = any(p.errors or p.timed_out for p in phases)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
