"""The default (CPU) mode of benchmarks/bench_generate.py at a reduced size: both tables come out
with every row and positive numbers, and ``--json`` has the raw numbers. Nothing about speed.

Its adapters must be made on the very base model the engine serves (the pretrained tiny): an
adapter made on another "tiny" is refused with AdapterMismatchError and the run crashes."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
THROUGHPUT_ROWS = ["one after another (1 adapter)", "batched, 1 adapter", "batched, 8 adapters"]
ADAPTERS = 8
MEMORY_ROWS = ["base model loaded", "+ 1 adapter", f"+ {ADAPTERS} adapters"]


def table_rows(stdout: str, labels: list[str]) -> dict[str, list[str]]:
    """The rows whose first cell starts with one of ``labels``, by that label."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        label = next((label for label in labels if cells[0].startswith(label)), None)
        if line.startswith("| ") and label is not None:
            rows[label] = cells
    return rows


def test_cpu_mode_prints_both_tables(tmp_path):
    raw_path = tmp_path / "raw.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--requests", "4", "--new-tokens", "4", "--adapters", str(ADAPTERS),
         "--repeats", "1", "--workdir", str(tmp_path / "work"), "--json", str(raw_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]

    throughput = table_rows(run.stdout, THROUGHPUT_ROWS)
    assert sorted(throughput) == sorted(THROUGHPUT_ROWS), run.stdout
    for cells in throughput.values():  # | run | time (s) (median) | tok/s | vs batch | vs sequential |
        line = " | ".join(cells)
        assert len(cells) == 5, line
        best, median = cells[1].replace("(", "").replace(")", "").split()
        assert float(best) >= 0 and float(median) >= 0, line  # 2 decimals: a tiny run may show 0.00
        assert float(cells[2]) > 0, line
        assert float(cells[3].removesuffix("x")) > 0 and float(cells[4].removesuffix("x")) > 0, line

    memory = table_rows(run.stdout, MEMORY_ROWS)
    assert sorted(memory) == sorted(MEMORY_ROWS), run.stdout
    for label, cells in memory.items():  # | memory | RSS | growth | adapters' own bytes |
        line = " | ".join(cells)
        assert len(cells) == 4, line
        assert float(cells[1]) > 0, line
        float(cells[2])  # the growth: RSS noise may make it any sign
        assert float(cells[3]) > 0 if label != "base model loaded" else float(cells[3]) == 0, line
    assert "\ntargets: 8-adapter batch / 1-adapter batch = " in run.stdout, run.stdout

    raw = json.loads(raw_path.read_text())
    assert raw["command"].endswith("--json " + str(raw_path))
    assert raw["requests"] == 4 and raw["new_tokens"] == 4 and raw["adapters"] == ADAPTERS
    for key in ("seq", "one", "eight"):
        row = raw["throughput"][key]
        assert row["best_s"] > 0 and row["tok_s"] > 0 and row["generated_tokens"] == 4 * 4, row
    memory_raw = raw["memory"]
    assert all(value > 0 for value in memory_raw.values()), memory_raw
    assert memory_raw["many_adapters_bytes"] == ADAPTERS * memory_raw["one_adapter_bytes"], memory_raw
