"""benchmarks/bench_layer.py at a reduced size: its header, a table row per N with numbers in
every column, and ``--json``'s raw numbers (one entry per N). Nothing about speed."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_layer.py"
HEADS = [3, 5]


def run_benchmark(tmp_path, *arguments: str):
    raw_path = tmp_path / "raw.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--tokens", "64", "--dim", "64", "--rank", "4", "--repeats", "2",
         "--heads", *map(str, HEADS), "--json", str(raw_path), *arguments],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    return run.stdout, json.loads(raw_path.read_text())


def table_rows(stdout: str) -> dict[int, list[str]]:
    """The table's rows by N: ``| N | base ms | loop ms | input-drop ms | ours ms | 4 ratios | 3 saved MiB | ratio |``."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def check(stdout: str, raw: dict, device: str, dtype: str) -> None:
    assert re.search(rf"^# bench_layer \d{{4}}-\d\d-\d\d: d=64, r=4, tokens=64, dropout=0.2, {dtype} on {device}, ",
                     stdout, re.MULTILINE), stdout
    rows = table_rows(stdout)
    assert sorted(rows) == HEADS, stdout
    for cells in rows.values():
        line = " | ".join(cells)
        assert len(cells) == 15, line
        # Times print with one decimal and saved bytes in MiB with two: at this size some show 0.0.
        assert all(float(cell) >= 0 for cell in cells[1:6]), line
        assert float(cells[6]) > 0 and float(cells[7]) > 0, line  # ours/base, ours/loop
        [float(cell) for cell in cells[8:10]]  # the adapter-only ratios: noise may give them any sign
        assert float(cells[10]) > 0, line  # ours / PyTorch path
        assert all(cell.endswith(" MiB") and float(cell.removesuffix(" MiB")) >= 0 for cell in cells[11:14]), line
        assert float(cells[14]) > 0, line

    assert raw["device"] == device and raw["dtype"] == dtype and raw["tokens"] == 64 and raw["dim"] == 64
    assert [row["heads"] for row in raw["rows"]] == HEADS
    for row in raw["rows"]:
        assert set(row["median_s"]) == {"base", "loop", "input_drop", "ours", "pytorch_path"}, row
        assert all(seconds > 0 for seconds in row["median_s"].values()), row
        assert set(row["saved_bytes"]) == {"ours", "input_drop", "loop"}, row
        assert all(saved > 0 for saved in row["saved_bytes"].values()), row


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_run_prints_a_row_per_head_count(tmp_path, dtype):
    stdout, raw = run_benchmark(tmp_path, "--dtype", dtype)
    check(stdout, raw, "cpu", dtype)


@pytest.mark.gpu
def test_cuda_run_in_bfloat16(tmp_path):
    stdout, raw = run_benchmark(tmp_path, "--device", "cuda", "--dtype", "bfloat16")
    check(stdout, raw, "cuda", "bfloat16")
    assert raw["machine"] == torch.cuda.get_device_name()
