"""benchmarks/bench_train.py on the CPU with tiny shapes (``--small``): every variant's row must
come out with a number, so a variant that errors fails here, not on a GPU machine lent for a
few minutes."""

import json
import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
sys.path.insert(0, str(BENCHMARK.parent))

from bench_train import VARIANTS  # noqa: E402


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The main table's rows by label: ``| label | params | eager ms | memory | x frozen | x PEFT | compiled ... |``."""
    labels = {v.label for v in VARIANTS}
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in labels:
            rows[cells[0]] = cells
    return rows


def test_small_run_measures_every_variant(tmp_path):
    raw_path = tmp_path / "raw.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--small", "--steps", "3", "--base-kernels", "--json", str(raw_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]

    rows = table_rows(run.stdout)
    assert sorted(rows) == sorted(v.label for v in VARIANTS), run.stdout
    liger = {v.label for v in VARIANTS if v.liger}
    for label, cells in rows.items():
        line = " | ".join(cells)
        assert len(cells) == 10 and "error" not in line, line
        if label in liger:  # Liger's kernels are CUDA's
            assert cells[2] == cells[6] == "Liger needs CUDA", line
            continue
        assert float(cells[2]) > 0 and float(cells[3]) > 0, line  # eager step ms, saved MiB
        assert cells[6] == "not run on CPU", line
    counts = {label: int(cells[1].replace(",", "")) for label, cells in rows.items() if label not in liger}
    by_key = {v.key: counts[v.label] for v in VARIANTS if not v.liger}
    assert by_key["frozen"] == 0
    # The paper's LoRA*2: PEFT LoRA r=10 has about the trainable parameters of N=3 r=4.
    assert abs(by_key["rlora-N3"] / by_key["peft-lora-r10"] - 1) < 0.05
    assert by_key["loop-MD-N3"] == by_key["rlora-N3"] and by_key["loop-MD-N5"] == by_key["rlora-N5"]
    assert len(re.findall(r"^\| [35] \| eager \| [\d.]+x / [\d.]+x \| [\d.]+x / [\d.]+x \| [\d.]+x / [\d.]+x \|$",
                          run.stdout, re.MULTILINE)) == 2, run.stdout
    eager_targets = re.findall(r"^- target .*, eager <= [\d.]+: [\d.]+, (?:PASS|FAIL)", run.stdout, re.MULTILINE)
    assert len(eager_targets) == 5, run.stdout

    raw = json.loads(raw_path.read_text())
    assert raw["command"].endswith("--small --steps 3 --base-kernels --json " + str(raw_path))
    assert all(raw["rows"][v.key]["eager"]["step_ms"] > 0 for v in VARIANTS if not v.liger)


def test_small_run_over_an_nf4_base():
    """Every variant's base quantized (QLoRA), PEFT's LoRA over bitsandbytes' layers as well."""
    import pytest

    pytest.importorskip("bitsandbytes")
    run = subprocess.run(
        [sys.executable, str(BENCHMARK), "--small", "--steps", "2", "--warmup", "1", "--quantization", "nf4",
         "--variants", "rlora-N3", "loop-MD-N3"],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert "every variant's base quantized to nf4 (bitsandbytes)" in run.stdout
    rows = table_rows(run.stdout)
    assert len(rows) == 4, run.stdout  # frozen, PEFT LoRA and the two asked for
    assert all(re.match(r"^\d", cells[2]) for cells in rows.values()), run.stdout
