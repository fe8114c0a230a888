"""benchmarks/bench_api.py at a reduced size (4 connections, 1 s per wrk run), on each database:
its table has a row per request with req/s, a ratio to the bare route and latencies, and no
unexpected answers. Nothing about speed.

It needs wrk (``/usr/bin/wrk``, Debian's package; ``make test`` installs it with
scripts/install-tools) and skips without it; the PostgreSQL run skips, as the service tests do,
when nothing listens at the tests' PostgreSQL address."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_service import BACKENDS, POSTGRES_ADMIN_URL, require_postgres

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_api.py"
REQUESTS = ["GET /bare (reference)", "GET /health", "GET /v1/jobs/{id}"]
DATABASE_LABELS = {"sqlite": r"SQLite \(WAL\)", "postgresql": r"PostgreSQL \d+(\.\d+)*"}
CONNECTIONS = 4


def wrk_installed() -> bool:
    return shutil.which("wrk") is not None or Path("/usr/bin/wrk").is_file()


@pytest.mark.parametrize("database", BACKENDS)
def test_reduced_run_prints_a_row_per_request(database):
    if not wrk_installed():
        pytest.skip("wrk is not installed: run scripts/install-tools (apt-get install wrk)")
    if database == "postgresql":
        require_postgres()
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--database", database, "--connections", str(CONNECTIONS), "--duration", "1",
         "--postgres-admin-url", POSTGRES_ADMIN_URL],
        capture_output=True, text=True, timeout=150,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]

    assert re.search(r"^- machine: .*; wrk on the same machine \(wrk ", run.stdout, re.MULTILINE), run.stdout
    rows = {}
    for line in run.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2 and cells[2] in REQUESTS:
            rows[cells[2]] = cells
    assert sorted(rows) == sorted(REQUESTS), run.stdout
    for request, cells in rows.items():
        # | database | connections | request | req/s | / bare | p50 ms | p99 ms | non-2xx | 429/503 | errors, timeouts |
        line = " | ".join(cells)
        assert len(cells) == 10, line
        assert re.fullmatch(DATABASE_LABELS[database], cells[0]) and cells[1] == str(CONNECTIONS), line
        assert float(cells[3]) > 0 and float(cells[4].removesuffix("x")) > 0, line
        assert 0 <= float(cells[5]) <= float(cells[6]), line  # p50 <= p99, in ms with one decimal
        # Answers other than 2xx only as 429/503 with Retry-After (the script's exit status says
        # so too); socket errors and timeouts counted (none may time out: exit status 0 above).
        assert int(cells[7]) == int(cells[8]) >= 0, line
        assert [int(n) >= 0 for n in cells[9].split(", ")] == [True, True], line
    assert rows["GET /bare (reference)"][4] == "1.00x"
