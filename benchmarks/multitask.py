"""R-LoRA against HydraLoRA and LoRA on tasks that conflict on the same inputs, with paired seeds.

    python benchmarks/multitask.py --tier cpu        # the tiny pretrained model, 2 processes,
                                                     # under 30 minutes on 2 free cores
    python benchmarks/multitask.py --tier gpu        # one call on an H100/H200, under 8 minutes:
                                                     # an ~85M model built from a config and
                                                     # pretrained from scratch in the same call
    python benchmarks/multitask.py --tier cpu --smoke   # the machinery end to end, tiny, ~1 min

What one call does:
  1. the base model: ``cpu``: the built-in tiny model (0.36M parameters) pretrained 3000 steps
     on the generic synthetic corpus (``rlora.pretrain``, cached on disk); ``gpu``: a
     Llama-architecture model built from a config (hidden 768, 12 layers, the byte vocabulary,
     ~85M parameters) and pretrained from scratch on the same corpus in the call (~2.5 min);
  2. six tasks over the *same* inputs, so only the task word tells them apart and they
     conflict (one word, six answers): ``upper``, ``rot13``, ``shift`` (each letter to the
     next, z to a), ``reverse``, ``sort`` and ``skip`` (every other letter), on random words of
     4 to 7 letters. The held-out words (``--eval-size`` per task, the same words for every
     task) never appear in training, for any task. A seed draws its own training sample;
  3. cells (a learning rate, a dropout, a number of epochs) and arms (the adapters, below);
     every arm of a cell runs with every seed; a seed changes the adapter initialisation, the
     dropout masks, the data order and the training sample, the same for every arm, so arms
     are compared in pairs. The cells sweep the learning rate (the paper's regime, about one
     epoch at 2e-4 to 1e-3, and the 5e-3 of earlier benchmarks) and dropout (0.05, 0.2);
  4. every run trains through ``rlora.train`` (the product's trainer) and reports what a job
     reports: exact match of greedy answers and answer-token loss per task, head similarity
     of the raw heads B and of the learned update B - B(0) per layer and module, routing by
     task (mutual information between task and top head), and the gradient norm per step;
  5. per cell: each arm's means over seeds, paired differences (R-LoRA minus HydraLoRA, minus
     each ablation, ...) with 95% t intervals over seeds, and the decision rule applied
     (``decide``, stated in docs/benchmarks.md).

Results go to ``--json`` as they come (rewritten atomically after every run, so an interrupted
or time-limited call leaves what it finished) and a markdown report to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import statistics
import string
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LETTERS = string.ascii_lowercase
TASKS = ("upper", "rot13", "shift", "reverse", "sort", "skip")
# The decision rule's "high": the paper (Figure 2) puts HydraLoRA's heads near 0.8 and R-LoRA's
# below 0.7; a HydraLoRA whose learned updates are less alike than 0.7 has heads that already
# differ, and random initialisation has nothing to fix.
HIGH_SIMILARITY = 0.7
# Exact match under FLOOR or over CEILING for every arm: a task that tells no arm apart.
FLOOR, CEILING = 0.02, 0.95
# Two-sided 95% quantiles of Student's t, by degrees of freedom (1.96 past 30).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


# --------------------------------------------------------------------------------------------
# Tasks: six answers to one input word.
# --------------------------------------------------------------------------------------------


def answer(task: str, word: str) -> str:
    if task == "upper":
        return word.upper()
    if task == "rot13":
        return "".join(LETTERS[(LETTERS.index(c) + 13) % 26] for c in word)
    if task == "shift":
        return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)
    if task == "reverse":
        return word[::-1]
    if task == "sort":
        return "".join(sorted(word))
    if task == "skip":
        return word[::2]
    raise ValueError(f"unknown task {task!r}")


def _words(rng: random.Random, count: int, exclude: set[str]) -> list[str]:
    words, seen = [], set(exclude)
    while len(words) < count:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 7)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def write_data(data_dir: Path, tasks: list[str], seeds: list[int], train_size: int, eval_size: int) -> dict:
    """The held-out file per task (the same ``eval_size`` words for every task, drawn once) and
    a training sample per seed and task (words never held out). Returns ``{"validation":
    {task: path}, "train": {seed: {task: path}}}``."""
    held_out = _words(random.Random("multitask:held-out"), eval_size, set())
    paths: dict = {"validation": {}, "train": {}}
    for task in tasks:
        paths["validation"][task] = _write_jsonl(data_dir / f"{task}.validation.jsonl", task, held_out)
    for seed in seeds:
        paths["train"][seed] = {}
        for task in tasks:
            words = _words(random.Random(f"multitask:{seed}:{task}"), train_size, set(held_out))
            paths["train"][seed][task] = _write_jsonl(data_dir / f"seed{seed}" / f"{task}.train.jsonl", task, words)
    return paths


def _write_jsonl(path: Path, task: str, words: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for word in words:
            handle.write(json.dumps({"prompt": f"{task} {word}", "completion": answer(task, word), "task": task}) + "\n")
    return str(path)


# --------------------------------------------------------------------------------------------
# Arms and cells
# --------------------------------------------------------------------------------------------

ARMS = ("lora", "lora-x2", "hydralora", "hydralora-rs", "rlora", "rlora-ref", "rlora-no-md", "rlora-no-mi")
# Paired differences reported per cell: (arm, minus arm), when both ran.
COMPARISONS = (
    ("rlora", "hydralora"),
    ("rlora", "rlora-no-md"),
    ("rlora", "rlora-no-mi"),
    ("rlora", "lora-x2"),
    ("rlora-ref", "hydralora-rs"),
    ("hydralora-rs", "hydralora"),
    ("lora-x2", "lora"),
)


def arm_adapters(linear_shapes: list[tuple[int, int]], rank: int, heads: int, alpha: float, targets) -> dict[str, dict]:
    """Adapter settings of every arm but dropout (a cell's). Every router starts Kaiming-uniform.

    ``lora``: rank ``rank``; ``lora-x2``: LoRA at the rank whose trainable-parameter count is
    closest to R-LoRA's (the paper's "LoRA*2"), alpha/r kept; ``hydralora``; ``hydralora-rs``:
    HydraLoRA with R-LoRA-reference's scaling alpha/sqrt(r) (a scaling control); ``rlora``: the
    paper's initialisation, alpha/r; ``rlora-ref``: the reference code's init scale r^(1/4)
    and its alpha/sqrt(r); ``rlora-no-md`` and ``rlora-no-mi``: the paper's ablations.
    """
    common = dict(alpha=alpha, rank=rank, target_modules=targets)
    multi = dict(common, heads=heads)
    lora_rank = max(1, round(multi_head_parameters(linear_shapes, rank, heads) / lora_parameters(linear_shapes, 1)))
    return {
        "lora": dict(method="lora", **common),
        "lora-x2": dict(method="lora", **dict(common, rank=lora_rank, alpha=alpha / rank * lora_rank)),
        "hydralora": dict(method="hydralora", **multi),
        "hydralora-rs": dict(method="hydralora", rank_stabilized=True, **multi),
        "rlora": dict(method="rlora", **multi),
        "rlora-ref": dict(method="rlora", init_scale="reference", rank_stabilized=True, **multi),
        "rlora-no-md": dict(method="rlora", multi_head_dropout=False, **multi),
        "rlora-no-mi": dict(method="rlora", random_init=False, **multi),
    }


def lora_parameters(linear_shapes, rank: int) -> int:
    return sum(rank * (d_in + d_out) for d_out, d_in in linear_shapes)


def multi_head_parameters(linear_shapes, rank: int, heads: int) -> int:
    return sum(rank * d_in + heads * d_out * rank + heads * d_in for d_out, d_in in linear_shapes)


def cells_for(tier: str, smoke: bool) -> list[dict]:
    """The cells of a tier: the paper's regime with every arm, and a sweep of learning rate and
    dropout with the arms the question is about."""
    pair = ["hydralora", "rlora"]
    cells = [
        dict(name="paper-lr1e-3-d0.2", lr=1e-3, dropout=0.2, epochs=1.0, arms=list(ARMS)),
        dict(name="lr1e-3-d0.05", lr=1e-3, dropout=0.05, epochs=1.0, arms=pair + ["rlora-no-md"]),
        dict(name="lr2e-4-d0.2", lr=2e-4, dropout=0.2, epochs=1.0, arms=pair),
        dict(name="lr5e-3-d0.2", lr=5e-3, dropout=0.2, epochs=1.0, arms=pair),
    ]
    if smoke:
        cells = [dict(cells[0], arms=["hydralora", "rlora", "lora-x2"]), dict(cells[2], arms=pair)]
    return cells


TIERS = {
    # The tiny pretrained model on the CPU: 2 processes of one thread each.
    "cpu": dict(seeds=8, workers=2, device="cpu", train_size=1000, eval_size=300, batch_size=32, rank=4, heads=3, alpha=32.0),
    # ~85M parameters built from a config on one GPU: several processes share it.
    # A call stops starting runs after time_limit seconds (pretraining included), so that it
    # ends within 8 minutes with what it finished.
    "gpu": dict(seeds=4, workers=8, device="cuda", train_size=2000, eval_size=300, batch_size=32, rank=4, heads=3, alpha=32.0,
                time_limit=400.0),
}
GPU_MODEL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)
SMOKE = dict(seeds=2, train_size=48, eval_size=12, batch_size=8)
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


# --------------------------------------------------------------------------------------------
# The base model
# --------------------------------------------------------------------------------------------


def build_model_from_config(path: Path, overrides: dict, seed: int = 0) -> Path:
    """A Llama-architecture model with the tiny model's byte tokenizer and ``overrides`` of its
    config, random weights (seeded), as an ordinary HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlora.tiny import TINY_CONFIG, build_tokenizer

    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides}))
        model.save_pretrained(staging, safe_serialization=True)
        build_tokenizer().save_pretrained(staging)
        os.rename(staging, path)  # complete or absent
        os.makedirs(staging)  # for the context manager to remove
    return path


def base_model(args) -> tuple[Path, dict]:
    """Build (and pretrain) the base model the tier asks for; returns its folder and a note."""
    from rlora.pretrain import pretrain_tiny_model
    from rlora.tiny import build_tiny_model

    cache = Path(args.cache_dir).expanduser()
    if args.smoke:
        source = build_model_from_config(cache / f"smoke-{args.tier}", SMOKE_MODEL)
    elif args.tier == "gpu":
        source = build_model_from_config(cache / "gpu-85m", GPU_MODEL)
    else:
        source = build_tiny_model(cache / "tiny", pretrained=False)  # the pretraining below starts from random weights
    started = time.perf_counter()
    path = pretrain_tiny_model(
        source, cache, steps=args.pretrain_steps, seed=0, corpus="generic-v2", batch_size=args.pretrain_batch_size,
        learning_rate=args.pretrain_lr, device="cuda" if args.device == "cuda" else "cpu",
    )
    info = json.loads((path / "rlora_pretrain.json").read_text())
    info["this_call_seconds"] = round(time.perf_counter() - started, 1)
    return path, info


def linear_shapes_of(base_path: Path, targets) -> tuple[list[tuple[int, int]], int]:
    """The (d_out, d_in) of every adapted linear layer, and the base model's parameter count."""
    from transformers import AutoModelForCausalLM

    from rlora import AdapterConfig
    from rlora.adapter.inject import target_linears

    model = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True)
    paths = target_linears(model, AdapterConfig(method="lora", target_modules=targets))
    shapes = [tuple(model.get_submodule(p).weight.shape) for p in paths]
    return shapes, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# One run, in a worker process
# --------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_one(spec: dict) -> dict:
    """Train one adapter with the product's trainer; return the numbers the report needs."""
    from rlora.training import TrainConfig, train

    mixture = [
        {"path": spec["train"][task], "validation_path": spec["validation"][task], "task": task, "weight": 1.0}
        for task in spec["tasks"]
    ]
    with tempfile.TemporaryDirectory(prefix="rlora-multitask-") as output_dir:
        config = TrainConfig(
            base_model=spec["base_model"],
            mixture=mixture,
            adapter={**spec["adapter"], "dropout": spec["dropout"], "seed": spec["seed"]},
            training=dict(
                max_steps=spec["steps"], batch_size=spec["batch_size"], learning_rate=spec["lr"], warmup_ratio=0.05,
                max_seq_len=40, eval_max_examples=spec["eval_size"], eval_max_new_tokens=10,
                checkpoint_every=10**6, seed=spec["seed"], device=spec["device"], precision="auto", compile="off",
            ),
            output_dir=output_dir,
        )
        started = time.perf_counter()
        metrics = train(config)
        seconds = time.perf_counter() - started
    return slim_metrics(metrics, spec, seconds)


def slim_metrics(metrics: dict, spec: dict, seconds: float) -> dict:
    """What one run contributes to the report, from the trainer's metrics."""
    evaluation = {t: {"accuracy": r["accuracy"], "loss": r["loss"], "examples": r["examples"]} for t, r in metrics["eval"].items()}
    similarity = metrics["head_similarity"]
    routing = (metrics.get("routing") or {}).get("by_task") or {}
    norms = [entry["grad_norm"] for entry in metrics["train_loss"]]
    tenth = max(1, len(norms) // 10)
    stride = max(1, len(norms) // 20)
    return {
        "cell": spec["cell"], "arm": spec["arm"], "seed": spec["seed"],
        "eval": evaluation,
        "exact_match": statistics.fmean(r["accuracy"] for r in evaluation.values()),
        "answer_loss": statistics.fmean(r["loss"] for r in evaluation.values()),
        "head_similarity": {"mean": similarity["mean"], "per_layer": similarity["per_layer"]},
        "update_similarity": similarity["learned_update"],
        "routing_mi": {
            "mean": routing.get("mean_mutual_information"), "max": routing.get("max_mutual_information"),
            "per_layer": {name: layer["mutual_information"] for name, layer in routing.get("per_layer", {}).items()},
        },
        "grad_norm": {
            "first_tenth": statistics.fmean(norms[:tenth]), "last_tenth": statistics.fmean(norms[-tenth:]),
            "curve": [[i + 1, round(norms[i], 5)] for i in range(0, len(norms), stride)],
        },
        "final_train_loss": statistics.fmean(e["loss"] for e in metrics["train_loss"][-tenth:]),
        "steps": metrics["steps"],
        "trainable_parameters": metrics["trainable_parameters"],
        "seconds": round(seconds, 2),
    }


# --------------------------------------------------------------------------------------------
# Statistics and the decision rule
# --------------------------------------------------------------------------------------------


def t_interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval of ``values`` (None bounds for fewer than 2)."""
    n = len(values)
    mean = statistics.fmean(values) if values else None
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired(runs: list[dict], arm: str, other: str, key) -> dict | None:
    """``key(run of arm) - key(run of other)`` over the seeds both ran, as a `t_interval`."""
    by_seed = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted(s for a, s in by_seed if a == arm and (other, s) in by_seed)
    pairs = [(key(by_seed[(arm, s)]), key(by_seed[(other, s)])) for s in seeds]
    values = [a - b for a, b in pairs if a is not None and b is not None]  # None: a single-head arm
    return t_interval(values) if values else None


def _update_mean(run: dict) -> float | None:
    return run["update_similarity"]["mean"]


def summarise_cell(runs: list[dict], tasks: list[str]) -> dict:
    arms = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        modules = sorted({m for r in mine for m in r["update_similarity"]["per_module"]})
        arms[arm] = {
            "seeds": len(mine),
            "exact_match": t_interval([r["exact_match"] for r in mine]),
            "answer_loss": t_interval([r["answer_loss"] for r in mine]),
            "per_task_exact_match": {t: statistics.fmean(r["eval"][t]["accuracy"] for r in mine) for t in tasks},
            "head_similarity": _mean_of(r["head_similarity"]["mean"] for r in mine),
            "update_similarity": _mean_of(_update_mean(r) for r in mine),
            "update_similarity_per_module": {m: _mean_of(r["update_similarity"]["per_module"].get(m) for r in mine) for m in modules},
            "routing_mi": _mean_of(r["routing_mi"]["mean"] for r in mine),
            "routing_mi_max": mine[0]["routing_mi"]["max"],
            "grad_norm_first_tenth": _mean_of(r["grad_norm"]["first_tenth"] for r in mine),
            "grad_norm_last_tenth": _mean_of(r["grad_norm"]["last_tenth"] for r in mine),
            "trainable_parameters": mine[0]["trainable_parameters"],
            "seconds": _mean_of(r["seconds"] for r in mine),
        }
    differences = {}
    for arm, other in COMPARISONS:
        if arm in arms and other in arms:
            differences[f"{arm} - {other}"] = {
                "exact_match": paired(runs, arm, other, lambda r: r["exact_match"]),
                "answer_loss": paired(runs, arm, other, lambda r: r["answer_loss"]),
                "update_similarity": paired(runs, arm, other, _update_mean),
            }
    summary = {"arms": arms, "paired": differences}
    summary["decision"] = decide(summary)
    return summary


def _mean_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def decide(summary: dict) -> dict:
    """The decision rule (docs/benchmarks.md): R-LoRA's claim is supported only where its paired
    difference in exact match against HydraLoRA excludes zero (above it) and HydraLoRA's
    learned-update similarity is high (>= HIGH_SIMILARITY) while R-LoRA's is lower (the paired
    interval below zero). Where HydraLoRA's updates are not similar, the cell cannot test the
    paper's premise, whatever the accuracies say."""
    arms, difference = summary["arms"], summary["paired"].get("rlora - hydralora")
    if difference is None or difference["exact_match"] is None or difference["exact_match"]["low"] is None:
        return {"verdict": "not enough runs", "reason": "needs rlora and hydralora on 2 seeds or more"}
    em, similarity = difference["exact_match"], difference["update_similarity"]
    hydra_similarity = arms["hydralora"]["update_similarity"]
    em_text = f"exact match rlora - hydralora {100 * em['mean']:+.1f} points [{100 * em['low']:+.1f}, {100 * em['high']:+.1f}]"
    if hydra_similarity is None or hydra_similarity < HIGH_SIMILARITY:
        return {
            "verdict": "cannot test the premise",
            "reason": f"HydraLoRA's learned-update similarity is {_fmt(hydra_similarity)} < {HIGH_SIMILARITY}: its heads "
                      f"already differ, random initialisation has nothing to fix; {em_text}",
        }
    similarity_lower = similarity is not None and similarity["high"] is not None and similarity["high"] < 0
    if em["low"] > 0 and similarity_lower:
        verdict = "supported"
    elif em["high"] < 0:
        verdict = "contradicted (R-LoRA worse)"
    else:
        verdict = "not supported"
    sim_text = "n/a" if similarity is None or similarity["low"] is None else (
        f"{similarity['mean']:+.3f} [{similarity['low']:+.3f}, {similarity['high']:+.3f}]")
    return {
        "verdict": verdict,
        "reason": f"{em_text}; HydraLoRA's learned-update similarity {hydra_similarity:.3f} (high); "
                  f"update similarity rlora - hydralora {sim_text}",
    }


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _interval(stats: dict | None, factor: float = 100.0, digits: int = 1, sign: str = "+") -> str:
    """``mean [low, high]`` of a `t_interval`, times ``factor``; ``sign="+"`` for differences."""
    if stats is None or stats["mean"] is None:
        return "n/a"
    spec = f"{sign}.{digits}f"
    if stats["low"] is None:
        return f"{factor * stats['mean']:{spec}}"
    return f"{factor * stats['mean']:{spec}} [{factor * stats['low']:{spec}}, {factor * stats['high']:{spec}}]"


def report(results: dict) -> str:
    tasks = results["tasks"]
    lines = [
        f"Tier {results['tier']}{' (smoke)' if results['smoke'] else ''}: base model {results['base_model']['parameters']:,} "
        f"parameters, pretrained {results['base_model']['pretrain']['steps']} steps; {len(tasks)} tasks on the same inputs, "
        f"exact match on {results['eval_size']} held-out prompts per task; {results['completed_runs']} of "
        f"{results['planned_runs']} runs done{'' if results['completed_runs'] == results['planned_runs'] else ' (partial)'}.",
        "",
    ]
    for cell in results["cells"]:
        summary = results["summary"].get(cell["name"])
        if summary is None:
            continue
        lines += [
            f"### {cell['name']}: lr {cell['lr']:g}, dropout {cell['dropout']}, {cell['epochs']:g} epoch(s), "
            f"{cell['steps']} steps",
            "",
            "| arm | seeds | params (% of base) | exact match % (95% CI) | " + " | ".join(tasks)
            + " | answer loss | head sim B | update sim B-B(0) | routing MI (max) | grad norm first/last 10% |",
            "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|",
        ]
        for arm, stats in summary["arms"].items():
            share = 100 * stats["trainable_parameters"] / results["base_model"]["parameters"]
            lines.append(
                f"| {arm} | {stats['seeds']} | {stats['trainable_parameters']:,} ({share:.2f}%) | "
                f"{_interval(stats['exact_match'], sign='')} | "
                + " | ".join(f"{100 * stats['per_task_exact_match'][t]:.1f}" for t in tasks)
                + f" | {_fmt(stats['answer_loss']['mean'])} | {_fmt(stats['head_similarity'], 2)} | "
                f"{_fmt(stats['update_similarity'], 2)} | {_fmt(stats['routing_mi'], 3)} ({_fmt(stats['routing_mi_max'], 2)}) | "
                f"{_fmt(stats['grad_norm_first_tenth'], 2)} / {_fmt(stats['grad_norm_last_tenth'], 2)} |"
            )
        lines += ["", "| paired difference | exact match (points, 95% CI) | answer loss | update similarity |", "|---|---|---|---|"]
        for name, difference in summary["paired"].items():
            lines.append(
                f"| {name} | {_interval(difference['exact_match'])} | {_interval(difference['answer_loss'], 1.0, 3)} | "
                f"{_interval(difference['update_similarity'], 1.0, 3)} |"
            )
        decision = summary["decision"]
        lines += ["", f"Decision: **{decision['verdict']}** ({decision['reason']}).", ""]
        per_task = [stats["per_task_exact_match"] for stats in summary["arms"].values()]
        floor = [t for t in tasks if all(p[t] < FLOOR for p in per_task)]
        ceiling = [t for t in tasks if all(p[t] > CEILING for p in per_task)]
        if floor or ceiling:  # such a task cannot tell arms apart by exact match (its loss still can)
            lines += [f"At the floor (every arm under {100 * FLOOR:g}%): {', '.join(floor) or 'none'}; "
                      f"at the ceiling (every arm over {100 * CEILING:g}%): {', '.join(ceiling) or 'none'}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="the machinery end to end at tiny size, on the CPU")
    parser.add_argument("--seeds", type=int, help="seeds per arm (default: the tier's)")
    parser.add_argument("--workers", type=int, help="processes running at once (default: the tier's)")
    parser.add_argument("--cells", nargs="+", help="run only these cells (by name)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which no new run starts; what finished is reported (partial)")
    parser.add_argument("--json", default=None, help="results file, rewritten after every run")
    parser.add_argument("--report", default=None, help="markdown report file")
    parser.add_argument("--cache-dir", default=os.path.join(os.environ.get("RLORA_HOME", "~/.rlora"), "benchmarks"))
    parser.add_argument("--from-json", default=None,
                        help="run nothing: summarise the runs of this results file again and print the report")
    args = parser.parse_args(argv)
    tier = dict(TIERS[args.tier])
    if args.smoke:
        tier.update(SMOKE, device="cpu", workers=min(tier["workers"], 2))
    args.device = tier["device"]
    args.seeds = list(range(args.seeds if args.seeds is not None else tier["seeds"]))
    args.workers = args.workers or tier["workers"]
    if args.time_limit is None and not args.smoke:
        args.time_limit = tier.get("time_limit")
    for key in ("train_size", "eval_size", "batch_size", "rank", "heads", "alpha"):
        setattr(args, key, tier[key])
    args.targets = ["gate_proj", "up_proj", "down_proj"]  # the paper's choice (Appendix C)
    if args.smoke:
        args.pretrain_steps, args.pretrain_batch_size, args.pretrain_lr = 20, 8, 3e-3
    elif args.tier == "gpu":
        args.pretrain_steps, args.pretrain_batch_size, args.pretrain_lr = 4000, 64, 1e-3
    else:
        args.pretrain_steps, args.pretrain_batch_size, args.pretrain_lr = 3000, 32, 3e-3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rereport(args)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(1 if args.device == "cpu" else 4)
    tasks = list(TASKS)
    base_path, pretrain = base_model(args)
    print(f"# base model {base_path.name}: pretrained {pretrain['steps']} steps, LM loss {pretrain['loss_before']:.2f} -> "
          f"{pretrain['loss_after']:.2f} ({pretrain['this_call_seconds']:.0f} s in this call)", flush=True)
    shapes, base_parameters = linear_shapes_of(base_path, args.targets)
    adapters = arm_adapters(shapes, args.rank, args.heads, args.alpha, args.targets)
    cells = [c for c in cells_for(args.tier, args.smoke) if not args.cells or c["name"] in args.cells]
    examples = len(tasks) * args.train_size
    for cell in cells:
        cell["steps"] = max(1, round(cell["epochs"] * examples / args.batch_size))

    results = {
        "tier": args.tier, "smoke": args.smoke, "device": args.device, "tasks": tasks, "eval_size": args.eval_size,
        "train_size_per_task": args.train_size, "batch_size": args.batch_size, "seeds": args.seeds, "workers": args.workers,
        "base_model": {"path": str(base_path), "parameters": base_parameters, "pretrain": pretrain},
        "adapters": adapters, "cells": cells, "high_similarity": HIGH_SIMILARITY,
        "runs": [], "summary": {}, "planned_runs": sum(len(c["arms"]) for c in cells) * len(args.seeds), "completed_runs": 0,
    }
    with tempfile.TemporaryDirectory(prefix="rlora-multitask-data-") as data_root:
        data = write_data(Path(data_root), tasks, args.seeds, args.train_size, args.eval_size)
        # Seed-major order: whenever the call stops, every cell has about as many complete seeds.
        specs = [
            dict(cell=cell["name"], arm=arm, seed=seed, adapter=adapters[arm], lr=cell["lr"], dropout=cell["dropout"],
                 steps=cell["steps"], batch_size=args.batch_size, eval_size=args.eval_size, tasks=tasks,
                 train={t: data["train"][seed][t] for t in tasks}, validation=data["validation"],
                 base_model=str(base_path), device=args.device)
            for seed in args.seeds for cell in cells for arm in cell["arms"]
        ]
        for record in _run_all(specs, args, started):
            results["runs"].append(record)
            results["completed_runs"] = len(results["runs"])
            results["elapsed_seconds"] = round(time.perf_counter() - started, 1)
            for cell in cells:
                runs = [r for r in results["runs"] if r["cell"] == cell["name"]]
                if runs:
                    results["summary"][cell["name"]] = summarise_cell(runs, tasks)
            print(f"# {record['cell']} {record['arm']:12s} seed {record['seed']}: exact match {100 * record['exact_match']:5.1f}%, "
                  f"answer loss {record['answer_loss']:.3f}, update sim {_fmt(record['update_similarity']['mean'])}, "
                  f"{record['seconds']:.0f} s  [{results['completed_runs']}/{results['planned_runs']}, "
                  f"{results['elapsed_seconds']:.0f} s]", flush=True)
            _write(args.json, json.dumps(results, indent=1))
            _write(args.report, report(results))
    text = report(results)
    print()
    print(text)
    print(f"Total {time.perf_counter() - started:.0f} s.")
    _write(args.report, text)
    return 0


def rereport(args) -> int:
    """The summaries, decisions and report of a results file, made again from its runs."""
    results = json.loads(Path(args.from_json).read_text())
    for cell in results["cells"]:
        runs = [r for r in results["runs"] if r["cell"] == cell["name"]]
        if runs:
            results["summary"][cell["name"]] = summarise_cell(runs, results["tasks"])
    text = report(results)
    print(text)
    _write(args.report, text)
    _write(args.json, json.dumps(results, indent=1))
    return 0


def _run_all(specs: list[dict], args, started: float):
    """Yield each run's record as it finishes; ``--workers`` processes at once (spawned: each
    its own torch, CUDA context included). No new run starts past ``--time-limit``."""
    def out_of_time() -> bool:
        return args.time_limit is not None and time.perf_counter() - started > args.time_limit

    threads = 1 if args.device == "cpu" else 2
    if args.workers == 1:
        for spec in specs:
            if out_of_time():
                return
            yield run_one(spec)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        pending, queue = set(), list(specs)
        while queue or pending:
            while queue and len(pending) < args.workers and not out_of_time():
                pending.add(pool.submit(run_one, queue.pop(0)))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def _write(path: str | None, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a reader never sees half a file)."""
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, target)


if __name__ == "__main__":
    raise SystemExit(main())
