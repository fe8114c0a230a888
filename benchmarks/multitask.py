"""Does R-LoRA help multi-task learning? LoRA (rank matched), HydraLoRA and R-LoRA on the tiny model.

    python benchmarks/multitask.py            # default: 3 seeds; ~11 minutes on a shared 2-core
                                              # CPU, of which ~3 pretraining (cached afterwards)
    python benchmarks/multitask.py --quick    # smoke run, 1 seed, ~2 minutes

What it does:
  1. builds the tiny model (`rlora.tiny`) and pretrains it (all parameters) for 3000 steps on
     generic synthetic text (`rlora.pretrain`, corpus generic-v2, cached on disk: the chat
     template with copied answers, repeated strings, case pairs, letter and number runs; no
     instruction words, none of the task formats below). With a weaker corpus (no case pairs)
     upper stayed at 0%: the adapters reuse what pretraining put in the frozen network;
  2. writes a synthetic multi-task mixture as JSONL files, one train and one held-out file per
     task, each task needing a different skill:
        upper    "upper cab"   -> "CAB"     a character mapping
        reverse  "reverse cab" -> "bac"     reordering
        skip     "skip abcdef" -> "ace"     every other character
        succ     "succ 41"     -> "42"      number knowledge
        sort     "sort cab"    -> "abc"     sorting letters
     (``--tasks`` also offers rot13, shift and add, which these adapters barely learn: <= 10%
     in our tries);
  3. trains `lora` (one head, rank chosen so its trainable-parameter count matches R-LoRA's:
     the paper's "LoRA*2"), `hydralora` and `rlora` with the same steps, learning rate, alpha/r,
     data and seeds, through `rlora.train`;
  4. prints a markdown table: exact-match accuracy per task by greedy generation on held-out
     prompts, the mean over tasks, and head similarity (mean over adapted layers), each as
     mean ± sample standard deviation over seeds. A seed changes the adapter initialisation,
     dropout and data order; the data and the pretrained base are the same for every seed.

The adapters sit on the MLP projections (gate/up/down, the paper's choice) unless
``--targets`` says otherwise; the frozen attention of the pretrained model is what they reuse.
Runs use one torch thread by default: on a 2-core machine shared with other work, two threads
made this small model several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rlora import AdapterConfig, attach, trainable_parameters  # noqa: E402
from rlora.adapter.config import VARIANTS  # noqa: E402
from rlora.pretrain import pretrain_tiny_model  # noqa: E402
from rlora.tiny import build_tiny_model  # noqa: E402

METHODS = ("lora", "hydralora", "rlora", "rlora-no-md", "rlora-no-mi")
DEFAULT_METHODS = ("lora", "hydralora", "rlora")
LETTERS = string.ascii_lowercase


# --------------------------------------------------------------------------------------------
# The tasks: (prompt, answer) generators. Prompts name the task; answers are short.
# --------------------------------------------------------------------------------------------


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _rot13(text: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 13) % 26] if c in LETTERS else c for c in text)


def task_upper(rng):  # a character mapping (a -> A)
    s = _word(rng, 3, 6)
    return f"upper {s}", s.upper()


def task_rot13(rng):  # another character mapping, conflicting with upper on the same input
    s = _word(rng, 3, 6)
    return f"rot13 {s}", _rot13(s)


def task_reverse(rng):  # reordering: a different attention pattern from copying
    s = _word(rng, 3, 6)
    return f"reverse {s}", s[::-1]


def task_skip(rng):  # every other character
    s = _word(rng, 4, 8)
    return f"skip {s}", s[::2]


def task_add(rng):  # arithmetic on small numbers
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add {a}+{b}", str(a + b)


def task_shift(rng):  # a character mapping: each letter to the next one (no z)
    s = "".join(rng.choice(LETTERS[:-1]) for _ in range(rng.randint(3, 6)))
    return f"shift {s}", "".join(LETTERS[LETTERS.index(c) + 1] for c in s)


def task_succ(rng):  # the next number
    n = rng.randint(0, 998)
    return f"succ {n}", str(n + 1)


def task_sort(rng):  # sort letters
    s = _word(rng, 3, 5)
    return f"sort {s}", "".join(sorted(s))


TASKS = {
    "upper": task_upper,
    "rot13": task_rot13,
    "reverse": task_reverse,
    "skip": task_skip,
    "add": task_add,
    "sort": task_sort,
    "shift": task_shift,
    "succ": task_succ,
}
DEFAULT_TASKS = ("upper", "reverse", "skip", "succ", "sort")


def write_mixture(data_dir: Path, tasks: list[str], train_size: int, eval_size: int, seed: int) -> list[dict]:
    """One train and one validation JSONL per task; validation prompts never appear in train."""
    mixture = []
    for task in tasks:
        rng = random.Random(f"multitask:{task}:{seed}")
        validation, seen = [], set()
        while len(validation) < eval_size:
            prompt, answer = TASKS[task](rng)
            if prompt not in seen:
                seen.add(prompt)
                validation.append((prompt, answer))
        train = []
        for _ in range(50 * train_size):
            if len(train) == train_size:
                break
            prompt, answer = TASKS[task](rng)
            if prompt not in seen:
                train.append((prompt, answer))
        paths = {}
        for split, rows in (("train", train), ("validation", validation)):
            paths[split] = data_dir / f"{task}.{split}.jsonl"
            with open(paths[split], "w") as handle:
                for prompt, answer in rows:
                    handle.write(json.dumps({"prompt": prompt, "completion": answer, "task": task}) + "\n")
        mixture.append({"path": str(paths["train"]), "validation_path": str(paths["validation"]), "task": task, "weight": 1.0})
    return mixture


# --------------------------------------------------------------------------------------------
# Adapters with matched budgets
# --------------------------------------------------------------------------------------------


def adapter_configs(base_path: Path, args) -> dict[str, dict]:
    """The adapters. The multi-head ones (HydraLoRA, R-LoRA and its two ablations) use ``--rank``
    and ``--heads``; LoRA's rank is
    the one whose trainable-parameter count is closest to R-LoRA's. Every method gets the same
    scaling alpha/r, so only the structure differs."""
    from transformers import AutoModelForCausalLM

    common = dict(alpha=args.scale * args.rank, dropout=args.dropout, target_modules=args.targets)
    configs = {
        name: dict(**VARIANTS[name], heads=args.heads, rank=args.rank, **common)
        for name in ("hydralora", "rlora", "rlora-no-md", "rlora-no-mi")
    }

    def count(config: dict) -> int:
        model = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True)
        return trainable_parameters(attach(model, AdapterConfig(**config)))

    target = count(configs["rlora"])
    per_rank = count(dict(method="lora", rank=1, alpha=args.scale, dropout=args.dropout, target_modules=args.targets))
    lora_rank = args.lora_rank or max(1, round(target / per_rank))
    configs["lora"] = dict(method="lora", rank=lora_rank, alpha=args.scale * lora_rank, dropout=args.dropout,
                           target_modules=args.targets)
    return {method: configs[method] for method in args.methods}


# --------------------------------------------------------------------------------------------
# One run. Swapping the trainer is a change to this function only.
# --------------------------------------------------------------------------------------------


def run_one(base_path: Path, mixture: list[dict], adapter: dict, seed: int, args, work_dir: Path) -> dict:
    """Train one adapter; return ``{"eval": {task: {"accuracy", "loss"}}, "head_similarity":
    {"mean"}, "trainable_parameters", "seconds"}`` (the trainer's metrics)."""
    from rlora.training import TrainConfig, train

    config = TrainConfig(
        base_model=str(base_path),
        mixture=mixture,
        adapter={**adapter, "seed": seed},
        training=dict(
            max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_ratio=0.05,
            max_seq_len=48, eval_max_examples=args.eval_size, eval_max_new_tokens=10,
            checkpoint_every=10**6, seed=seed, device="cpu", precision="float32",
        ),
        output_dir=str(work_dir),
    )
    start = time.perf_counter()
    metrics = train(config)
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def base_accuracy(base_path: Path, mixture: list[dict], args) -> dict[str, float]:
    """Exact match of the pretrained base model itself (no adapter) on each task."""
    from rlora.basemodels import load_base_model
    from rlora.data import MixtureSource, load_dataset
    from rlora.training import TrainingSettings
    from rlora.training.evaluate import evaluate

    model, tokenizer = load_base_model(base_path)
    model.eval()
    sources = [MixtureSource(examples=[], weight=1.0, task=m["task"], validation=load_dataset(m["validation_path"]))
               for m in mixture]
    settings = TrainingSettings(batch_size=64, max_seq_len=48, eval_max_examples=args.eval_size, eval_max_new_tokens=10)
    return {task: result["accuracy"] for task, result in evaluate(model, tokenizer, sources, settings, torch.device("cpu")).items()}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _cell(values: list[float], percent: bool = True) -> str:
    if not values or any(v is None for v in values):
        return "n/a"
    factor = 100.0 if percent else 1.0
    mean = statistics.fmean(values) * factor
    if len(values) == 1:
        return f"{mean:.1f}" if percent else f"{mean:.2f}"
    spread = statistics.stdev(values) * factor
    return f"{mean:.1f} ± {spread:.1f}" if percent else f"{mean:.2f} ± {spread:.2f}"


def report(results: dict[str, list[dict]], tasks: list[str], configs: dict[str, dict], base: dict[str, float]) -> str:
    lines = [
        "| method | rank × heads | trainable params | " + " | ".join(tasks) + " | mean | head similarity |",
        "|---|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    if base:
        lines.append(
            "| base (no adapter) | - | 0 | " + " | ".join(f"{100 * base[t]:.1f}" for t in tasks)
            + f" | {100 * statistics.fmean(base[t] for t in tasks):.1f} | - |"
        )
    for method, runs in results.items():
        config = configs[method]
        per_task = [_cell([run["eval"][t]["accuracy"] for run in runs]) for t in tasks]
        means = [statistics.fmean(run["eval"][t]["accuracy"] for t in tasks) for run in runs]
        similarity = [run["head_similarity"]["mean"] for run in runs]
        lines.append(
            f"| {method} | {config['rank']} × {config.get('heads') or 1} | {runs[0]['trainable_parameters']:,} | "
            + " | ".join(per_task) + f" | {_cell(means)} | {_cell(similarity, percent=False)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, fewer steps and eval examples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="LoRA's rank; default: matched to R-LoRA's trainable-parameter count")
    parser.add_argument("--scale", type=float, default=8.0, help="alpha / rank, the same for every method")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", nargs="+", default=["gate_proj", "up_proj", "down_proj"])
    parser.add_argument("--train-size", type=int, default=3000, help="training examples per task")
    parser.add_argument("--eval-size", type=int, default=100, help="held-out examples per task")
    parser.add_argument("--pretrain-corpus", default="generic-v2")
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="0: use the random tiny model")
    parser.add_argument("--cache-dir", default=os.path.join(os.environ.get("RLORA_HOME", "~/.rlora"), "benchmarks"),
                        help="where the tiny model and its pretrained copy are cached")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for this tiny model on a shared 2-core machine)")
    parser.add_argument("--json", help="also write every run's metrics here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_size, args.train_size = args.seeds[:1], 500, 50, 1000
        args.pretrain_steps = min(args.pretrain_steps, 1000)
    if len(args.targets) == 1 and args.targets[0] == "all-linear":
        args.targets = "all-linear"
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    cache = Path(args.cache_dir).expanduser()
    base_path = build_tiny_model(cache / "tiny", pretrained=False)  # the pretraining below starts from random weights
    if args.pretrain_steps:
        t0 = time.perf_counter()
        base_path = pretrain_tiny_model(base_path, cache, steps=args.pretrain_steps, seed=0,
                                        corpus=args.pretrain_corpus)
        pretrain_info = json.loads((base_path / "rlora_pretrain.json").read_text())
        print(f"# pretrained base: {base_path.name} (LM loss {pretrain_info['loss_before']:.2f} -> "
              f"{pretrain_info['loss_after']:.2f}; trained in {pretrain_info['train_seconds']:.0f} s, "
              f"this call {time.perf_counter() - t0:.1f} s)", flush=True)

    configs = adapter_configs(base_path, args)
    results: dict[str, list[dict]] = {method: [] for method in configs}
    with tempfile.TemporaryDirectory(prefix="rlora-multitask-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        mixture = write_mixture(data_dir, args.tasks, args.train_size, args.eval_size, seed=0)
        base = base_accuracy(base_path, mixture, args)
        for seed in args.seeds:
            for method, adapter in configs.items():
                metrics = run_one(base_path, mixture, adapter, seed, args, Path(tmp) / f"{method}-{seed}")
                results[method].append(metrics)
                accuracy = {t: round(metrics["eval"][t]["accuracy"], 3) for t in args.tasks}
                print(f"# seed {seed} {method:9s} {metrics['seconds']:5.1f} s  {accuracy}", flush=True)

    print()
    print(f"Tiny model ({'pretrained %d steps' % args.pretrain_steps if args.pretrain_steps else 'random init'}), "
          f"adapters on {args.targets if isinstance(args.targets, str) else ', '.join(args.targets)}; "
          f"{args.steps} steps × batch {args.batch_size}, lr {args.lr}, alpha/r {args.scale}, dropout {args.dropout}; "
          f"seeds {args.seeds}; exact match (%) on {args.eval_size} held-out prompts per task, "
          "mean ± sample std over seeds.")
    print()
    print(report(results, args.tasks, configs, base))
    print()
    print(f"Total {time.perf_counter() - started:.0f} s.")
    if args.json:
        slim = {m: [{k: r[k] for k in ("eval", "head_similarity", "trainable_parameters", "seconds")} for r in runs]
                for m, runs in results.items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "configs": configs, "base": base, "runs": slim}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
