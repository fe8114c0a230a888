"""Every GPU measurement of the project in one command, within a fixed time (issue 21).

    python3 benchmarks/gpu_suite.py [--out DIR] [--with-tests]     (on a GPU: about 8 minutes)
    python3 benchmarks/gpu_suite.py --small [--out DIR]             (CPU, tiny shapes: the code path)

The steps run one after another, each as its own process (a crash or a hang costs that step,
not the suite) under its own time budget, the whole under ``--total`` seconds:

    tests          with --with-tests: ``pytest -m gpu`` (the kernels and the GPU paths in bfloat16)
    layer          bench_layer.py on cuda in bfloat16: one adapted layer, ours (Triton kernels)
                   against the base layer, the reference loop, input dropout and the PyTorch path
    train-0.5b     bench_train.py at Qwen2.5-0.5B's shape, 8 x 1024 tokens, eager, every variant
                   and the Liger rows (the training targets are defined here)
    serve          bench_generate.py --gpu: 64 requests x 128 tokens, 8 adapters mixed, against
                   transformers' static-cache compiled generate (the serving targets)
    train-0.5b-compiled   the same shape with the decoder layers compiled: ours MD and ID and the baselines
    train-3b       bench_train.py at Qwen2.5-3B's shape, 4 x 1024: rlora N=3 and the baselines, eager

Each benchmark writes its JSON after every row (``DIR/<step>.json``), so a step cut off by its
budget keeps the rows it finished. After every step the suite rewrites ``DIR/suite.json`` (each
step's status, seconds, command and numbers) and ``DIR/suite.md``: the issue's targets in one
table, then each step's own markdown tables, ready for docs/benchmarks.md. Exit status 1 when a
step failed, timed out or had a failing row; the others still ran. ``--budget STEP=SECONDS``
changes one step's budget; ``--only STEP ...`` runs some.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]  # after the python interpreter; "{json}" is this step's JSON path
    budget_s: float
    what: str


def gpu_steps() -> list[Step]:
    train = [str(HERE / "bench_train.py"), "--warmup", "2", "--steps", "5", "--json", "{json}"]
    return [
        Step("tests", ["-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")], 150, "pytest -m gpu"),
        Step("layer", [str(HERE / "bench_layer.py"), "--device", "cuda", "--dtype", "bfloat16", "--repeats", "10",
                       "--json", "{json}"], 40, "one adapted layer"),
        Step("train-0.5b", [*train, "--model", "qwen2.5-0.5b", "--base-kernels"], 130, "training, 0.5B shape, eager"),
        Step("serve", [str(HERE / "bench_generate.py"), "--gpu", "--repeats", "2", "--json", "{json}"], 130,
             "serving, 0.5B shape"),
        Step("train-0.5b-compiled", [*train, "--model", "qwen2.5-0.5b", "--compile", "--variants", "rlora-N3", "rlora-noMD-N3"],
             100, "training, 0.5B shape, compiled"),
        Step("train-3b", [*train, "--model", "qwen2.5-3b", "--variants", "rlora-N3", "rlora-noMD-N3"], 80,
             "training, 3B shape, eager"),
        Step("memory", [str(HERE / "bench_memory.py"), "--measure", "--json", "{json}"], 60,
             "peak memory, bfloat16 and NF4 bases, against the estimate"),
    ]


def small_steps() -> list[Step]:
    """The same steps on the CPU at tiny sizes: a check that each one runs and reports."""
    train = [str(HERE / "bench_train.py"), "--small", "--warmup", "1", "--steps", "2", "--json", "{json}"]
    return [
        Step("layer", [str(HERE / "bench_layer.py"), "--tokens", "64", "--dim", "64", "--rank", "4", "--repeats", "2",
                       "--json", "{json}"], 60, "one adapted layer"),
        Step("train-0.5b", [*train, "--base-kernels"], 120, "training, small shape"),
        Step("serve", [str(HERE / "bench_generate.py"), "--gpu", "--small", "--repeats", "1", "--json", "{json}"], 120,
             "serving, small shape"),
        Step("train-3b", [*train, "--variants", "rlora-N3"], 120, "training, small shape, a subset"),
    ]


class Suite:
    """The steps' outcomes, written out after each one."""

    def __init__(self, out: Path, args, steps: list[Step]):
        self.out, self.args, self.steps = out, args, steps
        self.results: dict[str, dict] = {}
        self.started = time.monotonic()
        self.environment = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name(args.small), "python": platform.python_version(),
            "command": shlex.join(["python3", "benchmarks/gpu_suite.py", *sys.argv[1:]]),
        }

    def remaining(self) -> float:
        return self.args.total - (time.monotonic() - self.started)

    def run(self, step: Step) -> None:
        budget = min(self.args.budgets.get(step.name, step.budget_s), self.remaining())
        json_path = self.out / f"{step.name}.json"
        json_path.unlink(missing_ok=True)
        argv = [sys.executable, *[arg.replace("{json}", str(json_path)) for arg in step.argv]]
        result = {"what": step.what, "command": shlex.join(argv[1:]), "budget_s": round(budget, 1)}
        if budget <= 0:
            self.record(step, {**result, "status": "skipped: the suite's time was spent"}, "")
            return
        start = time.monotonic()
        with open(self.out / f"{step.name}.log", "w") as log:
            try:
                done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, timeout=budget,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
                stdout, status = done.stdout, "ok" if done.returncode == 0 else f"failed (exit status {done.returncode})"
            except subprocess.TimeoutExpired as expired:
                stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
                status = f"timed out after {budget:.0f} s"
        result.update(status=status, seconds=round(time.monotonic() - start, 1))
        if json_path.exists():
            try:
                result["numbers"] = json.loads(json_path.read_text())
            except json.JSONDecodeError as error:  # cut off while writing: the rows before are in the log
                result["numbers_error"] = repr(error)
        self.record(step, result, stdout)

    def record(self, step: Step, result: dict, stdout: str) -> None:
        (self.out / f"{step.name}.md").write_text(stdout)
        self.results[step.name] = result
        print(f"[gpu_suite] {step.name}: {result['status']} ({result.get('seconds', 0)} s)", file=sys.stderr, flush=True)
        (self.out / "suite.json").write_text(json.dumps({**self.environment, "steps": self.results}, indent=1) + "\n")
        (self.out / "suite.md").write_text(self.markdown())

    def targets(self) -> list[tuple[str, str, str]]:
        """(step, target, verdict) of every target the benchmarks report."""
        rows = []
        for name, result in self.results.items():
            for target in result.get("numbers", {}).get("targets", []):
                if target.get("value") is None and result["status"] == "ok":
                    continue  # a mode the step does not run (compiled, in an eager step)
                if "ratio" in target:  # bench_generate's: a ratio at least a target
                    text = f"{target['ratio']} >= {target['target']}"
                else:  # bench_train's: a named ratio at most a limit
                    text = f"{target['target']} <= {target['limit']}"
                value = target.get("value")
                verdict = "not measured" if value is None else f"{value:.2f}, {'PASS' if target['passed'] else 'FAIL'}"
                rows.append((name, text, verdict))
        return rows

    def markdown(self) -> str:
        env = self.environment
        lines = [f"# GPU suite ({env['date']})", "", f"- device: {env['device']}; python {env['python']}",
                 f"- command: `{env['command']}`", ""]
        lines += ["| step | what | status | seconds |", "|---|---|---|---:|"]
        lines += [f"| {name} | {r['what']} | {r['status']} | {r.get('seconds', '-')} |" for name, r in self.results.items()]
        targets = self.targets()
        if targets:
            lines += ["", "| step | target | measured |", "|---|---|---|"]
            lines += [f"| {step} | {text} | {verdict} |" for step, text, verdict in targets]
        for name in self.results:
            body = (self.out / f"{name}.md").read_text().strip()
            if body:
                lines += ["", f"## {name}", "", body]
        return "\n".join(lines) + "\n"

    @property
    def failed(self) -> bool:
        return any(r["status"] != "ok" for r in self.results.values())


def device_name(small: bool) -> str:
    if small:
        return f"CPU ({platform.machine()}), a smoke run of the code path, not a measurement"
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    except ImportError:
        return "torch missing"


def parse_budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget takes STEP=SECONDS, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-suite", help="folder for the JSON, markdown and logs (default: ./gpu-suite)")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: a check of the code path")
    parser.add_argument("--with-tests", action="store_true", help="run pytest -m gpu first")
    parser.add_argument("--total", type=float, default=480, help="seconds for the whole suite (default 480: 8 minutes)")
    parser.add_argument("--budget", action="append", type=parse_budget, default=[], metavar="STEP=SECONDS")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    args = parser.parse_args()
    args.budgets = dict(args.budget)

    steps = small_steps() if args.small else gpu_steps()
    if not args.with_tests:
        steps = [s for s in steps if s.name != "tests"]
    known = {s.name for s in steps}
    for name in [*(args.only or []), *args.budgets]:
        if name not in known:
            parser.error(f"no step {name!r}: the steps are {', '.join(sorted(known))}")
    if args.only:
        steps = [s for s in steps if s.name in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(out, args, steps)
    for step in steps:
        suite.run(step)
    print(suite.markdown())
    sys.exit(1 if suite.failed else 0)


if __name__ == "__main__":
    main()
