"""The GPU mode of benchmarks/bench_generate.py, run on the CPU with tiny shapes (``--gpu --small``):
every row of its table must come out with a number, so a row that errors fails here, not on a
GPU machine lent for a few minutes."""

import json
import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
THROUGHPUT_ROWS = ["E1", "E2", "E3", "E4", "G1", "G2", "G3", "G4"]
FIRST_TOKEN_ROWS = ["T1", "T2"]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by key: ``| key | run | batch | tok/s | TTFT ms | ratio |``."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in THROUGHPUT_ROWS + FIRST_TOKEN_ROWS:
            rows[cells[0]] = cells
    return rows


def line_of(cells: list[str]) -> str:
    return " | ".join(cells)


def test_small_gpu_mode_measures_every_row_on_the_cpu(tmp_path):
    raw_path = tmp_path / "raw.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--gpu", "--small", "--json", str(raw_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]

    rows = table_rows(run.stdout)
    assert sorted(rows) == sorted(THROUGHPUT_ROWS + FIRST_TOKEN_ROWS), run.stdout
    for key, cells in rows.items():
        assert len(cells) == 6 and "error" not in line_of(cells), line_of(cells)
        value = cells[3] if key in THROUGHPUT_ROWS else cells[4]
        assert float(value.split()[0]) > 0, line_of(cells)
    targets = re.findall(r"^- target \S+ / \S+ >= [\d.]+: [\d.]+, (?:PASS|FAIL)$", run.stdout, re.MULTILINE)
    assert len(targets) == 3, run.stdout

    raw = json.loads(raw_path.read_text())
    assert raw["command"].endswith("--gpu --small --json " + str(raw_path))
    assert all(raw["rows"][key]["tok_s"] > 0 for key in THROUGHPUT_ROWS)
    assert all(raw["rows"][key]["ttft_ms"] > 0 for key in FIRST_TOKEN_ROWS)
