"""benchmarks/gpu_suite.py on the CPU (``--small``): every step runs and reports, the suite's
JSON and markdown are written, and a step that runs out of time costs that step alone."""

import json
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def test_small_suite_writes_every_step_and_survives_one_that_times_out(tmp_path):
    out = tmp_path / "suite"
    run = subprocess.run(
        [sys.executable, str(SUITE), "--small", "--out", str(out), "--budget", "serve=0.5"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 1, run.stdout + run.stderr[-4000:]  # the timed-out step fails the suite

    raw = json.loads((out / "suite.json").read_text())
    steps = raw["steps"]
    assert list(steps) == ["layer", "train-0.5b", "serve", "train-3b"]
    assert steps["serve"]["status"].startswith("timed out after"), steps["serve"]
    for name in ("layer", "train-0.5b", "train-3b"):
        assert steps[name]["status"] == "ok", steps[name]
        assert steps[name]["numbers"]["rows"], name  # the benchmark's own JSON, merged
    assert steps["train-0.5b"]["numbers"]["rows"]["rlora-N3"]["eager"]["step_ms"] > 0

    markdown = (out / "suite.md").read_text()
    assert run.stdout.strip() == markdown.strip()  # printed at the end, too
    assert "| serve | serving, small shape | timed out" in markdown
    assert "| train-0.5b | MD / ID step at N=3 (ours), eager <= 0.85 |" in markdown
    for name in ("layer", "train-0.5b", "train-3b"):
        assert f"\n## {name}\n" in markdown
    assert "| N | base ms |" in markdown and "| variant | trainable params |" in markdown


def test_an_unknown_step_is_refused():
    run = subprocess.run([sys.executable, str(SUITE), "--small", "--only", "nope"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no step 'nope'" in run.stderr
