"""The multi-task benchmark's machinery (benchmarks/multitask.py): its data, arms, statistics and
decision rule, and one smoke-size call end to end."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("multitask_benchmark", ROOT / "benchmarks" / "multitask.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tasks_give_six_different_answers_to_one_input(bench):
    answers = {task: bench.answer(task, "zebra") for task in bench.TASKS}
    assert answers == {"upper": "ZEBRA", "rot13": "mroen", "shift": "afcsb", "reverse": "arbez", "sort": "aberz", "skip": "zba"}
    assert len(set(answers.values())) == len(answers)


def test_held_out_words_are_shared_by_tasks_and_never_trained_on(bench, tmp_path):
    data = bench.write_data(tmp_path, ["upper", "sort"], seeds=[0, 1], train_size=200, eval_size=50)

    def words(path):
        return [json.loads(line)["prompt"].split(" ", 1)[1] for line in open(path)]

    held_out = words(data["validation"]["upper"])
    assert held_out == words(data["validation"]["sort"]) and len(set(held_out)) == 50
    trained = {seed: set(words(data["train"][seed]["upper"])) | set(words(data["train"][seed]["sort"])) for seed in (0, 1)}
    assert not (trained[0] | trained[1]) & set(held_out)
    assert trained[0] != trained[1]  # a seed draws its own sample
    first = json.loads(open(data["train"][0]["sort"]).readline())
    assert first["completion"] == "".join(sorted(first["prompt"].split()[1])) and first["task"] == "sort"


def test_parameter_matched_lora_and_scaling_controls(bench):
    shapes = [(256, 128), (256, 128), (128, 256)] * 2  # the tiny model's gate, up, down
    arms = bench.arm_adapters(shapes, rank=4, heads=3, alpha=32.0, targets=["gate_proj", "up_proj", "down_proj"])
    assert set(arms) == set(bench.ARMS)
    multi = bench.multi_head_parameters(shapes, 4, 3)
    lora_rank = arms["lora-x2"]["rank"]
    assert abs(bench.lora_parameters(shapes, lora_rank) - multi) <= bench.lora_parameters(shapes, 1) / 2
    assert arms["lora-x2"]["alpha"] / lora_rank == arms["lora"]["alpha"] / 4  # alpha/r kept
    assert arms["hydralora-rs"]["rank_stabilized"] and arms["rlora-ref"]["rank_stabilized"]
    assert arms["rlora-ref"]["init_scale"] == "reference" and "rank_stabilized" not in arms["rlora"]


def test_t_interval_and_paired_differences(bench):
    stats = bench.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n)
    assert stats["mean"] == 2.5 and stats["low"] == pytest.approx(2.5 - half) and stats["high"] == pytest.approx(2.5 + half)
    assert bench.t_interval([1.0])["low"] is None
    runs = [dict(arm=arm, seed=seed, exact_match=value) for arm, seed, value in
            [("a", 0, 0.5), ("b", 0, 0.4), ("a", 1, 0.7), ("b", 1, 0.5), ("a", 2, 0.9)]]  # seed 2 has no pair
    difference = bench.paired(runs, "a", "b", lambda r: r["exact_match"])
    assert difference["n"] == 2 and difference["mean"] == pytest.approx(0.15)


@pytest.mark.parametrize(
    "em, hydra_similarity, similarity, verdict",
    [
        ([0.02, 0.03, 0.04, 0.03], 0.85, [-0.3, -0.2, -0.25, -0.3], "supported"),
        ([0.02, 0.03, 0.04, 0.03], 0.85, [0.1, -0.2, 0.2, -0.1], "not supported"),  # heads no less alike
        ([-0.01, 0.03, 0.0, 0.01], 0.85, [-0.3, -0.2, -0.25, -0.3], "not supported"),  # interval holds zero
        ([-0.05, -0.04, -0.06, -0.05], 0.85, [-0.3, -0.2, -0.25, -0.3], "contradicted (R-LoRA worse)"),
        ([0.05, 0.04, 0.06, 0.05], 0.3, [-0.1, -0.1, -0.1, -0.1], "cannot test the premise"),
    ],
)
def test_decision_rule(bench, em, hydra_similarity, similarity, verdict):
    summary = {
        "arms": {"hydralora": {"update_similarity": hydra_similarity}, "rlora": {"update_similarity": None}},
        "paired": {"rlora - hydralora": {"exact_match": bench.t_interval(em), "update_similarity": bench.t_interval(similarity)}},
    }
    assert bench.decide(summary)["verdict"] == verdict


def test_smoke_call_end_to_end(bench, tmp_path):
    """A whole call at tiny size: pretraining, two arms, two seeds, in one process; the JSON has
    every run, the summaries, the paired differences and a decision."""
    out = tmp_path / "results.json"
    assert bench.main([
        "--tier", "gpu", "--smoke", "--workers", "1", "--cells", "lr2e-4-d0.2", "--cache-dir", str(tmp_path / "cache"),
        "--json", str(out), "--report", str(tmp_path / "report.md"),
    ]) == 0
    results = json.loads(out.read_text())
    assert results["completed_runs"] == results["planned_runs"] == 4 and results["device"] == "cpu"
    run = results["runs"][0]
    assert set(run["eval"]) == set(bench.TASKS) and all(r["examples"] == 12 for r in run["eval"].values())
    assert run["update_similarity"]["per_module"].keys() == {"gate_proj", "up_proj", "down_proj"}
    assert run["routing_mi"]["max"] == pytest.approx(math.log(3)) and run["grad_norm"]["first_tenth"] > 0
    summary = results["summary"]["lr2e-4-d0.2"]
    assert summary["paired"]["rlora - hydralora"]["exact_match"]["n"] == 2
    assert summary["decision"]["verdict"] in {"supported", "not supported", "contradicted (R-LoRA worse)", "cannot test the premise"}
    report = (tmp_path / "report.md").read_text()
    assert "Decision:" in report
    # A results file re-reported: the same summaries and report, nothing run again.
    assert bench.main(["--from-json", str(out), "--report", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == report


def test_cpu_tier_smoke_prints_every_cell_table(bench, tmp_path):
    """``--tier cpu --smoke`` as a user runs it (a subprocess, the tier's 2 worker processes):
    every cell's table has a row per arm with numbers, its paired differences and a decision."""
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multitask.py"), "--tier", "cpu", "--smoke",
         "--cache-dir", str(tmp_path / "cache"), "--json", str(out), "--report", str(tmp_path / "report.md")],
        capture_output=True, text=True, timeout=150,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    cells = bench.cells_for("cpu", True)
    sections = run.stdout.split("\n### ")[1:]
    assert [section.split(":", 1)[0] for section in sections] == [cell["name"] for cell in cells], run.stdout
    for cell, section in zip(cells, sections):
        rows = {}
        for line in section.splitlines():
            row = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| ") and row[0] in cell["arms"]:
                rows[row[0]] = row
        assert sorted(rows) == sorted(cell["arms"]), section
        for row in rows.values():  # | arm | seeds | params (%) | exact match (CI) | 6 tasks | answer loss | ... |
            line = " | ".join(row)
            assert len(row) == 15 and row[1] == "2", line
            assert int(row[2].split()[0].replace(",", "")) > 0, line
            assert 0 <= float(row[3].split()[0]) <= 100 and all(0 <= float(v) <= 100 for v in row[4:10]), line
            assert float(row[10]) > 0, line
        assert re.search(r"^\| rlora - hydralora \| [+-][\d.]+ \[", section, re.MULTILINE), section
        assert "\nDecision: **" in section, section
    results = json.loads(out.read_text())
    assert results["tier"] == "cpu" and results["smoke"] and results["device"] == "cpu" and results["workers"] == 2
    assert results["completed_runs"] == results["planned_runs"] == sum(len(c["arms"]) for c in cells) * 2
