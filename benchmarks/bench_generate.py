"""Generation throughput and memory of the inference engine on the tiny model.

    python3 benchmarks/bench_generate.py [--requests 16] [--new-tokens 64] [--adapters 100]

Throughput (generated tokens per second, greedy, eos ignored so every request makes exactly
``--new-tokens`` tokens) of 16 requests:

* one after another, one adapter (the baseline a server without batching gives);
* batched, all on one adapter;
* batched across 8 adapters (requests round-robin over them).

Memory: the process's resident set (RSS, after a collection and ``malloc_trim``) with the base
model and 1 adapter loaded, and with 100, beside the adapters' own tensor bytes. Targets:
across-8 >= 0.7x one-adapter batch, >= 4x one after another; memory grows by about the adapters'
own size, never by a model copy. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rlora  # noqa: E402
from rlora import AdapterConfig  # noqa: E402
from rlora.serve import InferenceEngine  # noqa: E402
from rlora.tiny import build_tiny_model  # noqa: E402

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def rss_bytes() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_adapters(model_path: Path, out: Path, count: int) -> list[Path]:
    """``count`` distinct rlora adapters (attach once, perturb differently, save each)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    rlora.attach(model, AdapterConfig(method="rlora", heads=3, rank=4, target_modules=TARGETS))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    paths = []
    for i in range(count):
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(start[name] + 0.05 * torch.randn(param.shape, generator=generator))
        paths.append(rlora.save(model, out / f"adapter-{i:03d}", base_model_name="tiny"))
    return paths


def prompts(count: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while seven tenants fine tune adapters".split()
    return [" ".join(words[(i * 3) % len(words) :] + words[: (i * 3) % len(words)])[: 12 + (i * 7) % 40] for i in range(count)]


def run_batch(engine, items, new_tokens) -> tuple[float, int]:
    params = {"max_new_tokens": new_tokens, "ignore_eos_token": True}
    start = time.perf_counter()
    handles = [engine.submit(text, params, adapter_id=adapter) for text, adapter in items]
    results = [h.result() for h in handles]
    elapsed = time.perf_counter() - start
    return elapsed, sum(r.generated_tokens for r in results)


def run_sequential(engine, items, new_tokens) -> tuple[float, int]:
    params = {"max_new_tokens": new_tokens, "ignore_eos_token": True}
    start = time.perf_counter()
    tokens = sum(engine.generate(text, params, adapter_id=adapter).generated_tokens for text, adapter in items)
    return time.perf_counter() - start, tokens


def best_of(runs):
    elapsed = min(r[0] for r in runs)
    return elapsed, runs[0][1], statistics.median(r[0] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    # One torch thread by default: the tiny model's matmuls are too small to split, and on a
    # shared 2-core machine two OpenMP threads spinning against other processes are many times slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="where to build the model and adapters (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model_path = build_tiny_model(work / "models" / "tiny")
        adapter_paths = make_adapters(model_path, work / "adapters", max(args.adapters, 8))
        ids = [f"a{i:03d}" for i in range(len(adapter_paths))]

        engine = InferenceEngine(cache_dir=work / "models", device=args.device, adapter_cache_bytes=1 << 34)
        engine.base_model("tiny")
        rss_base = rss_bytes()
        engine.adapter(ids[0], adapter_paths[0])
        rss_one = rss_bytes()
        one_bytes = engine.adapters.nbytes
        for adapter_id, path in zip(ids[: args.adapters], adapter_paths[: args.adapters]):
            engine.adapter(adapter_id, path)
        rss_many = rss_bytes()
        many_bytes = engine.adapters.nbytes
        model_bytes = sum(p.numel() * p.element_size() for p in engine.base_model("tiny").model.parameters())

        for i in range(8):
            engine.adapter(ids[i], adapter_paths[i])
        texts = prompts(args.requests)
        one = [(t, ids[0]) for t in texts]
        eight = [(t, ids[i % 8]) for i, t in enumerate(texts)]
        run_batch(engine, eight, 8)  # warm up
        run_sequential(engine, one[:2], 8)

        # The three runs interleaved, so that each repeat sees the same load on a shared machine.
        runs = {"seq": [], "one": [], "eight": []}
        for _ in range(args.repeats):
            runs["seq"].append(run_sequential(engine, one, args.new_tokens))
            runs["one"].append(run_batch(engine, one, args.new_tokens))
            runs["eight"].append(run_batch(engine, eight, args.new_tokens))
        engine.close()
        (seq_t, seq_tokens, seq_med), (one_t, one_tokens, one_med), (eight_t, eight_tokens, eight_med) = (
            best_of(runs[k]) for k in ("seq", "one", "eight")
        )

    seq_tps, one_tps, eight_tps = seq_tokens / seq_t, one_tokens / one_t, eight_tokens / eight_t
    mib = 1 / (1 << 20)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"## bench_generate ({now})\n")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores ({args.threads} torch threads), {platform.system()} {platform.release()}; "
          f"device {args.device}; torch {torch.__version__}; python {platform.python_version()}")
    print(f"{args.requests} requests x {args.new_tokens} new tokens, greedy, tiny model; best of {args.repeats} (median in brackets)\n")
    print("| run | time (s) | generated tok/s | vs one-adapter batch | vs one after another |")
    print("|---|---:|---:|---:|---:|")
    print(f"| one after another (1 adapter) | {seq_t:.2f} ({seq_med:.2f}) | {seq_tps:.0f} | {seq_tps / one_tps:.2f}x | 1.00x |")
    print(f"| batched, 1 adapter | {one_t:.2f} ({one_med:.2f}) | {one_tps:.0f} | 1.00x | {one_tps / seq_tps:.2f}x |")
    print(f"| batched, 8 adapters | {eight_t:.2f} ({eight_med:.2f}) | {eight_tps:.0f} | {eight_tps / one_tps:.2f}x | {eight_tps / seq_tps:.2f}x |")
    print()
    print("| memory | RSS (MiB) | growth over base (MiB) | adapters' own bytes (MiB) |")
    print("|---|---:|---:|---:|")
    print(f"| base model loaded (weights {model_bytes * mib:.2f} MiB) | {rss_base * mib:.1f} | 0.0 | 0.00 |")
    print(f"| + 1 adapter | {rss_one * mib:.1f} | {(rss_one - rss_base) * mib:.1f} | {one_bytes * mib:.2f} |")
    print(f"| + {args.adapters} adapters | {rss_many * mib:.1f} | {(rss_many - rss_base) * mib:.1f} | {many_bytes * mib:.2f} |")
    print()
    growth = rss_many - rss_one
    own = many_bytes - one_bytes
    print(f"targets: 8-adapter batch / 1-adapter batch = {eight_tps / one_tps:.2f} (>= 0.7: {'met' if eight_tps >= 0.7 * one_tps else 'MISSED'}); "
          f"8-adapter batch / one after another = {eight_tps / seq_tps:.2f} (>= 4: {'met' if eight_tps >= 4 * seq_tps else 'MISSED'}); "
          f"memory growth 1 -> {args.adapters} adapters {growth * mib:.1f} MiB for {own * mib:.1f} MiB of adapter tensors "
          f"(ratio {growth / own if own else float('nan'):.2f}; a model copy would add {model_bytes * mib:.1f} MiB each)")


if __name__ == "__main__":
    main()
