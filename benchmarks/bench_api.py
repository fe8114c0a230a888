"""Throughput and latency of the REST API under load, against a bare FastAPI route.

For each database (PostgreSQL: a fresh database this script creates and drops; SQLite: the
embedded default under a temporary RLORA_HOME) it starts ``rlora serve --no-worker`` on a free
port of 127.0.0.1 (embedded broker, no worker: the job stays queued) and, beside it, a bare
FastAPI app served by uvicorn the same way (one process, the same uvicorn options). Then wrk
(``/usr/bin/wrk``, Debian's package) loads, at each connection count in turn, each of:

    bare     GET /bare             a bare FastAPI route returning a constant: the reference
    health   GET /health           the service's liveness route
    job      GET /v1/jobs/{id}     authorised: the key looked up, the job read, the adapter looked up

and the table gives req/s, p50/p99, non-2xx answers (those that are 429 or 503 without
Retry-After apart), socket errors and timeouts, and req/s as a ratio to the bare route in the same
run (ratios travel between machines better than absolute numbers).

    python benchmarks/bench_api.py                                   # both databases
    python benchmarks/bench_api.py --database sqlite --duration 5 --connections 16 64 256
"""

from __future__ import annotations

import argparse
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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's service package, as the servers it starts use
POSTGRES_ADMIN_URL = os.environ.get("RLORA_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
WRK = shutil.which("wrk") or "/usr/bin/wrk"
TARGETS = {"bare": "GET /bare (reference)", "health": "GET /health", "job": "GET /v1/jobs/{id}"}

# wrk's Lua: the Authorization header, and the status codes counted per thread (with a count of
# 429 and 503 answers that lack Retry-After), summed and printed as JSON at the end.
WRK_SCRIPT = r"""
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {}; no_retry_after = 0 end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if (status == 429 or status == 503) and headers["Retry-After"] == nil and headers["retry-after"] == nil then
    no_retry_after = no_retry_after + 1
  end
end
function done(summary, latency, requests)
  local total, missing = {}, 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do total[tostring(status)] = (total[tostring(status)] or 0) + n end
    missing = missing + thread:get("no_retry_after")
  end
  local parts = {}
  for status, n in pairs(total) do table.insert(parts, string.format('"%s": %d', status, n)) end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "statuses": {%s}, '
    .. '"no_retry_after": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), table.concat(parts, ", "),
    missing, e.connect, e.read, e.write, e.timeout))
end
"""


def bare_app():
    """The reference: FastAPI with one constant route, nothing else."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/bare")
    async def bare() -> dict:
        return {"status": "ok"}

    return app


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
    """The ``rlora`` console script installed beside this interpreter (in .venv under make),
    or the module it points at; never another environment's ``rlora`` that PATH finds first."""
    script = Path(sys.executable).with_name("rlora")
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "service.cli", *args]


@contextmanager
def server(command: list[str], env: dict, log_path: Path, probe: str):
    """A server process answering ``probe`` (a URL) with 200; stopped on exit."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"{command} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(probe, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{probe} did not answer within 90 s")
                time.sleep(0.3)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def make_tenant(url: str) -> str:
    """A tenant straight in the database (the API has no route for it): its key."""
    from service.api.auth import create_tenant
    from service.db import Database

    db = Database(url)
    try:
        with db.session() as session:
            return create_tenant(session, f"bench-{secrets.token_hex(3)}")[1]
    finally:
        db.dispose()


def make_job(base: str, key: str) -> str:
    """One queued job of the tenant (its id), submitted through the API."""
    records = "".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1), "task": "add"}) + "\n" for i in range(16))
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        file = client.post("/v1/files", files={"file": ("d.jsonl", records)})
        file.raise_for_status()
        job = client.post("/v1/jobs", json={
            "base_model": "tiny",
            "mixture": [{"file_id": file.json()["id"], "weight": 1.0, "task": "add"}],
            "adapter": {"method": "rlora", "heads": 3, "rank": 4},
            "training": {"max_steps": 100, "device": "cpu"},
        })
        job.raise_for_status()
        return job.json()["id"]


# --- load ---------------------------------------------------------------------------------


def wrk(url: str, connections: int, duration: float, script: Path, key: str = "") -> dict:
    command = [WRK, f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "BENCH_KEY": key}, timeout=duration + 60)
    line = next((line for line in out.stdout.splitlines() if line.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    result = json.loads(line[len("BENCH "):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def bench_database(args, url: str, database: str, home: Path, script: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLORA_")}
    env.update(RLORA_HOME=str(home), RLORA_DATABASE_URL=url, PYTHONPATH=str(REPO))
    service_port, bare_port = free_port(), free_port()
    service, bare = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{bare_port}"
    rows = []
    with ExitStack() as stack:
        stack.enter_context(server(
            rlora_command("serve", "--no-worker", "--host", "127.0.0.1", "--port", str(service_port)),
            env, home / "serve.log", f"{service}/health",
        ))
        stack.enter_context(server(
            [sys.executable, __file__, "--serve-bare", str(bare_port)], env, home / "bare.log", f"{bare}/bare",
        ))
        key = make_tenant(url)
        urls = {"bare": (f"{bare}/bare", ""), "health": (f"{service}/health", ""), "job": (f"{service}/v1/jobs/{make_job(service, key)}", key)}
        for name, (target, target_key) in urls.items():
            wrk(target, 16, 1, script, target_key)  # warm-up: code paths, pools
        for connections in args.connections:
            results = {name: wrk(target, connections, args.duration, script, target_key) for name, (target, target_key) in urls.items()}
            for name, result in results.items():
                rows.append(dict(database=database, connections=connections, target=name, ratio=result["rps"] / results["bare"]["rps"], **result))
    return rows


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


def unexpected(row: dict) -> int:
    """Answers outside the targets: not 2xx, and not a 429 or 503 with Retry-After."""
    off = sum(n for status, n in row["statuses"].items() if not status.startswith("2") and status not in ("429", "503"))
    return off + row["no_retry_after"]


def report(rows: list[dict], args, load_before: float) -> str:
    wrk_version = subprocess.run([WRK, "--version"], capture_output=True, text=True).stdout.split("\n")[0].split(" Copyright")[0]
    lines = [
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, no GPU; wrk on the same machine ({wrk_version}, 2 threads); "
        f"Python {platform.python_version()}; load average before the run {load_before:.2f}",
        f"- command: `python benchmarks/bench_api.py --database {' '.join(args.database)} --duration {args.duration:g} "
        f"--connections {' '.join(map(str, args.connections))}`",
        "- servers: `rlora serve --no-worker` (one uvicorn process, embedded broker) and the bare app, one uvicorn process",
        "",
        "| database | connections | request | req/s | / bare | p50 ms | p99 ms | non-2xx | 429/503 | errors, timeouts |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        non_2xx = sum(n for status, n in row["statuses"].items() if not status.startswith("2"))
        limited = sum(row["statuses"].get(status, 0) for status in ("429", "503"))
        errors = f"{row['connect'] + row['read'] + row['write']}, {row['timeout']}"
        lines.append(
            f"| {row['database']} | {row['connections']} | {TARGETS[row['target']]} | {row['rps']:.0f} | {row['ratio']:.2f}x | "
            f"{row['p50_us'] / 1000:.1f} | {row['p99_us'] / 1000:.1f} | {non_2xx} | {limited} | {errors} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", nargs="+", choices=["postgresql", "sqlite"], default=["sqlite", "postgresql"])
    parser.add_argument("--connections", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each wrk run")
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the reference server
    args = parser.parse_args()
    if args.serve_bare:
        import uvicorn

        uvicorn.run(bare_app(), host="127.0.0.1", port=args.serve_bare, log_level="info")
        return 0
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rlora-bench-") as folder:
        script = Path(folder) / "bench.lua"
        script.write_text(WRK_SCRIPT)
        for database in args.database:
            home = Path(folder) / database
            home.mkdir()
            if database == "postgresql":
                with fresh_postgres_database(args.postgres_admin_url) as (url, name):
                    rows += bench_database(args, url, name, home, script)
            else:
                rows += bench_database(args, f"sqlite:///{home / 'rlora.db'}", "SQLite (WAL)", home, script)
    print(report(rows, args, load_before))
    worst = max(args.connections)
    bad = [r for r in rows if unexpected(r) or (r["connections"] == worst and r["timeout"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
