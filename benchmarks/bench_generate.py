"""Generation throughput and memory of the inference engine: on the tiny model (CPU), and with
``--gpu`` beside transformers' own ``generate`` on a 0.5B-shaped model.

    python3 benchmarks/bench_generate.py [--requests 16] [--new-tokens 64] [--adapters 100] [--json PATH]
    python3 benchmarks/bench_generate.py --gpu [--small] [--json PATH] [--repeats 3]

Without ``--gpu``: throughput (generated tokens per second, greedy, eos ignored so every request
makes exactly ``--new-tokens`` tokens) of 16 requests:

* one after another, one adapter (the baseline a server without batching gives);
* batched, all on one adapter;
* batched across 8 adapters (requests round-robin over them).

Memory: the process's resident set (RSS, after a collection and ``malloc_trim``) with the base
model and 1 adapter loaded, and with 100, beside the adapters' own tensor bytes. Targets:
across-8 >= 0.7x one-adapter batch, >= 4x one after another; memory grows by about the adapters'
own size, never by a model copy. The adapters are made on the very model the engine serves
(base model ``tiny``: the shipped pretrained weights, built into the work folder's models
directory). Prints a markdown table; ``--json`` writes the raw numbers.

``--gpu`` (issue 10; cuda, bfloat16): a Llama with Qwen2.5-0.5B's dimensions (hidden 896,
intermediate 4864, 24 layers, 14 heads, 2 KV heads), random weights from a config and the tiny
model's byte vocabulary, saved as a model folder (nothing is downloaded), and 8 R-LoRA adapters
(3 heads, rank 4, gate/up/down) made with ``rlora.attach``/``rlora.save``. 64 requests x 128 new
tokens, greedy, eos ignored, generated tokens per second of:

* the engine (``InferenceEngine``'s public API only): base model only, 1 adapter, 8 adapters
  mixed (round-robin), and one request alone (4 one after another, batch 1);
* the engine's time to first token (TTFT) of a 512-token prompt alone and while 63 requests decode;
* transformers' ``generate`` on the base model, batch 64 and batch 1 (the same 4 prompts one after
  another): dynamic cache, and static cache compiled by ``generate`` itself (``reduce-overhead``).

Every run's shape runs once untimed first (compiled ``generate`` twice), so CUDA graphs and
compilation are not timed. Targets: 8 adapters mixed >= 0.8x compiled ``generate`` at batch 64;
one request alone >= 0.8x compiled ``generate`` at batch 1; 8 adapters mixed >= 0.9x the engine's
base-only batch. A row that fails shows its error and the others still run (exit status 1).
Prints a markdown table with the date, device, versions and command; ``--json`` writes the raw
numbers. ``--gpu --small`` runs the same code on the CPU in float32 with tiny shapes (hidden 64,
2 layers, 8 requests x 16 tokens, a 64-token prompt): a check of the code path, not a measurement
(``generate`` compiles on CUDA only, so its static-cache rows are not compiled there).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rlora  # noqa: E402
from rlora import AdapterConfig  # noqa: E402
from rlora.serve import InferenceEngine, Limits  # noqa: E402
from rlora.basemodels import resolve_base_model  # noqa: E402
from rlora.tiny import TINY_CONFIG, TINY_MODEL_NAME, build_tokenizer  # noqa: E402

from bench_support import cpu_name  # noqa: E402

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def rss_bytes() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_adapters(model_path: Path, out: Path, count: int, base_model_name: str = TINY_MODEL_NAME) -> list[Path]:
    """``count`` distinct rlora adapters (attach once, perturb differently, save each). Every
    trainable tensor is perturbed, the heads (B) included: an adapter whose heads still equal
    its frozen correction would leave the outputs as the base model's."""
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
        paths.append(rlora.save(model, out / f"adapter-{i:03d}", base_model_name=base_model_name))
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


def cpu_benchmark(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        # The engine's base model "tiny", built where the engine looks for it (its cache_dir):
        # the shipped pretrained weights, so the adapters' base-model fingerprint is the served one's.
        model_path = resolve_base_model(TINY_MODEL_NAME, None, work / "models")
        adapter_paths = make_adapters(model_path, work / "adapters", max(args.adapters, 8))
        ids = [f"a{i:03d}" for i in range(len(adapter_paths))]

        engine = InferenceEngine(cache_dir=work / "models", device=args.device, adapter_cache_bytes=1 << 34)
        engine.base_model(TINY_MODEL_NAME)
        rss_base = rss_bytes()
        engine.adapter(ids[0], adapter_paths[0])
        rss_one = rss_bytes()
        one_bytes = engine.adapters.nbytes
        for adapter_id, path in zip(ids[: args.adapters], adapter_paths[: args.adapters]):
            engine.adapter(adapter_id, path)
        rss_many = rss_bytes()
        many_bytes = engine.adapters.nbytes
        model_bytes = sum(p.numel() * p.element_size() for p in engine.base_model(TINY_MODEL_NAME).model.parameters())

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
    if args.json:
        runs_raw = {"seq": (seq_t, seq_med, seq_tokens), "one": (one_t, one_med, one_tokens), "eight": (eight_t, eight_med, eight_tokens)}
        raw = {
            "date": now, "machine": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "device": args.device,
            "torch": torch.__version__, "python": platform.python_version(),
            "command": shlex.join(["python3", "benchmarks/bench_generate.py", *sys.argv[1:]]),
            "requests": args.requests, "new_tokens": args.new_tokens, "adapters": args.adapters, "repeats": args.repeats,
            "throughput": {
                key: {"best_s": best, "median_s": median, "generated_tokens": tokens, "tok_s": tokens / best}
                for key, (best, median, tokens) in runs_raw.items()
            },
            "memory": {
                "model_bytes": model_bytes, "rss_base_bytes": rss_base, "rss_one_adapter_bytes": rss_one,
                "rss_many_adapters_bytes": rss_many, "one_adapter_bytes": one_bytes, "many_adapters_bytes": many_bytes,
            },
        }
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")
    print(f"targets: 8-adapter batch / 1-adapter batch = {eight_tps / one_tps:.2f} (>= 0.7: {'met' if eight_tps >= 0.7 * one_tps else 'MISSED'}); "
          f"8-adapter batch / one after another = {eight_tps / seq_tps:.2f} (>= 4: {'met' if eight_tps >= 4 * seq_tps else 'MISSED'}); "
          f"memory growth 1 -> {args.adapters} adapters {growth * mib:.1f} MiB for {own * mib:.1f} MiB of adapter tensors "
          f"(ratio {growth / own if own else float('nan'):.2f}; a model copy would add {model_bytes * mib:.1f} MiB each)")


# The GPU mode (issue 10): the engine beside transformers' own `generate` on a 0.5B-shaped model.


@dataclass(frozen=True)
class GpuModeShape:
    """The model and load of the GPU mode."""

    model_name: str  # its folder under the models directory, the engine's base model name
    hidden_size: int
    intermediate_size: int
    layers: int
    attention_heads: int
    kv_heads: int
    requests: int
    new_tokens: int
    alone_requests: int  # run one after another for the batch-1 rows
    long_prompt_tokens: int  # the time-to-first-token prompt, bos included
    ttft_trials: int
    device: str
    dtype: torch.dtype


# A Llama with Qwen2.5-0.5B's dimensions and the tiny model's byte vocabulary (the engine decodes text).
QWEN05_DIMS = GpuModeShape(
    "llama-qwen2.5-0.5b-dims", hidden_size=896, intermediate_size=4864, layers=24, attention_heads=14, kv_heads=2,
    requests=64, new_tokens=128, alone_requests=4, long_prompt_tokens=512, ttft_trials=5, device="cuda", dtype=torch.bfloat16,
)
# The same code path on a CPU in seconds: a check that every row runs, not a measurement.
SMALL_DIMS = GpuModeShape(
    "llama-small", hidden_size=64, intermediate_size=176, layers=2, attention_heads=4, kv_heads=2,
    requests=8, new_tokens=16, alone_requests=2, long_prompt_tokens=64, ttft_trials=3, device="cpu", dtype=torch.float32,
)
MIXED_ADAPTERS = 8
# What each row is compared with (its ratio column), and the targets among those ratios.
REFERENCES = {"E1": ["G3"], "E2": ["G3", "E1"], "E3": ["G3", "E1"], "E4": ["G4"], "T2": ["T1"], "G1": ["G3"], "G2": ["G4"]}
RATIO_TARGETS = [("E3", "G3", 0.8), ("E4", "G4", 0.8), ("E3", "E1", 0.9)]


def row_labels(shape: GpuModeShape) -> dict[str, tuple[str, int]]:
    """Each row's key, what it runs, and how many requests run at once."""
    prompt = f"TTFT of a {shape.long_prompt_tokens}-token prompt"
    # transformers' generate compiles its decode step on CUDA only (and not for a dynamic cache).
    static = "static cache + compile" if shape.device == "cuda" else "static cache, not compiled on a CPU"
    return {
        "E1": ("engine, base model only", shape.requests),
        "E2": ("engine, 1 adapter", shape.requests),
        "E3": (f"engine, {MIXED_ADAPTERS} adapters mixed (round-robin)", shape.requests),
        "E4": ("engine, one request alone, 1 adapter", 1),
        "T1": (f"engine, {prompt} alone, 1 adapter", 1),
        "T2": (f"engine, {prompt} while {shape.requests - 1} requests decode ({MIXED_ADAPTERS} adapters mixed)", shape.requests),
        "G1": ("transformers generate, dynamic cache, base model", shape.requests),
        "G2": ("transformers generate, dynamic cache, base model", 1),
        "G3": (f"transformers generate, {static}, base model", shape.requests),
        "G4": (f"transformers generate, {static}, base model", 1),
    }


def build_model_folder(shape: GpuModeShape, models_dir: Path) -> Path:
    """The model as a folder the engine loads by name: random weights from a config, nothing downloaded."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{
        **TINY_CONFIG, "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.attention_heads,
        "num_key_value_heads": shape.kv_heads, "max_position_embeddings": 4096,
    })
    torch.manual_seed(0)
    # Initialised where it will run: a 0.5B model's random init takes a while on a CPU.
    with torch.device(shape.device):
        model = AutoModelForCausalLM.from_config(config, dtype=shape.dtype)
    path = models_dir / shape.model_name
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def long_prompt(tokens: int) -> str:
    """``tokens - 1`` bytes of text: with the bos the engine puts first, ``tokens`` tokens."""
    text = " ".join(prompts(16))
    return (text * (tokens // len(text) + 1))[: tokens - 1]


def throughput(run_once, repeats: int, warmups: int = 1) -> dict:
    """Generated tokens per second of ``run_once`` (returns seconds, tokens), after ``warmups``
    untimed runs: CUDA graphs are captured and compilation done there, not in the timed runs."""
    for _ in range(warmups):
        run_once()
    best, tokens, median = best_of([run_once() for _ in range(repeats)])
    return {"tok_s": tokens / best, "median_tok_s": tokens / median, "generated_tokens": tokens, "best_s": best}


def first_token(engine, prompt: str, params: dict, expected_tokens: int, adapter_id: str):
    """Seconds from submitting ``prompt`` to its first token, and its handle (still running)."""
    start = time.perf_counter()
    handle = engine.submit(prompt, params, adapter_id=adapter_id)
    next(handle.events())
    elapsed = time.perf_counter() - start
    if handle.prompt_tokens != expected_tokens:
        raise RuntimeError(f"the long prompt is {handle.prompt_tokens} tokens, not {expected_tokens}")
    return elapsed, handle


def first_token_alone(engine, prompt: str, params: dict, expected_tokens: int, adapter_id: str) -> float:
    elapsed, handle = first_token(engine, prompt, params, expected_tokens, adapter_id)
    handle.result()
    return elapsed


def first_token_under_load(engine, prompt: str, params: dict, expected_tokens: int, adapter_id: str, background: list) -> float:
    """Time to first token of ``prompt`` submitted once every ``background`` request decodes."""
    handles = [engine.submit(text, params, adapter_id=adapter) for text, adapter in background]
    for handle in handles:
        next(handle.events())
    elapsed, handle = first_token(engine, prompt, params, expected_tokens, adapter_id)
    all_finished = all(h.done() for h in handles)
    for h in [*handles, handle]:
        h.result()
    if all_finished:
        raise RuntimeError("the background requests finished before the prompt's first token: nothing decoded beside it")
    return elapsed


def median_first_token_ms(trial, trials: int) -> dict:
    trial()  # warm-up: the prompt's prefill shape, captured or compiled before timing
    times = [trial() for _ in range(trials)]
    return {"ttft_ms": 1000 * statistics.median(times), "all_ms": [1000 * t for t in times]}


def generate_seconds(model, batches: list, new_tokens: int) -> tuple[float, int]:
    """transformers' ``generate`` over ``batches`` one after another: seconds, generated tokens."""
    start = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for inputs in batches:
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    if out.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


class GpuReport:
    """The rows, measured one by one: a row that fails keeps its error and the others go on."""

    def __init__(self, shape: GpuModeShape, args):
        import transformers

        self.shape = shape
        self.args = args
        self.labels = row_labels(shape)
        self.rows: dict[str, dict] = {}
        self.environment = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name() if shape.device == "cuda" else cpu_name(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "command": shlex.join(["python3", "benchmarks/bench_generate.py", *sys.argv[1:]]),
        }

    def measure(self, key: str, measurement) -> None:
        try:
            result = measurement()
        except Exception as error:  # noqa: BLE001 - the row shows it; the other rows still run
            traceback.print_exc()
            result = {"error": repr(error)}
        self.record(key, result)

    def fail(self, keys: list[str], error: Exception) -> None:
        for key in keys:
            self.record(key, {"error": repr(error)})

    def record(self, key: str, result: dict) -> None:
        label, batch = self.labels[key]
        self.rows[key] = {"label": label, "batch": batch, **result}
        print(f"{key} {label}: {result}", file=sys.stderr, flush=True)
        self.write_json()

    def value(self, key: str) -> float | None:
        row = self.rows.get(key, {})
        return row.get("tok_s", row.get("ttft_ms"))

    def ratio(self, key: str, reference: str) -> float | None:
        value, base = self.value(key), self.value(reference)
        return value / base if value is not None and base else None

    def targets(self) -> list[dict]:
        targets = []
        for key, reference, minimum in RATIO_TARGETS:
            ratio = self.ratio(key, reference)
            targets.append({"ratio": f"{key} / {reference}", "value": ratio, "target": minimum,
                            "passed": None if ratio is None else ratio >= minimum})
        return targets

    def write_json(self) -> None:
        if self.args.json:
            shape = {**dataclasses.asdict(self.shape), "dtype": str(self.shape.dtype)}
            raw = {**self.environment, "shape": shape, "rows": self.rows, "targets": self.targets()}
            Path(self.args.json).write_text(json.dumps(raw, indent=1) + "\n")

    def print_markdown(self) -> None:
        shape, env = self.shape, self.environment
        print(f"## bench_generate --gpu ({env['date']})\n")
        print(f"- device: {env['device']} ({shape.device}, {str(shape.dtype).removeprefix('torch.')})")
        print(f"- torch {env['torch']}, transformers {env['transformers']}, python {env['python']}")
        print(f"- command: `{env['command']}`")
        print(f"- model: Llama, hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, {shape.layers} layers, "
              f"{shape.attention_heads} heads, {shape.kv_heads} KV heads, random weights, byte vocabulary "
              f"({TINY_CONFIG['vocab_size']}); {MIXED_ADAPTERS} R-LoRA adapters (3 heads, rank 4, gate/up/down)")
        print(f"- load: {shape.requests} requests x {shape.new_tokens} new tokens, greedy, eos ignored; batch 1: "
              f"{shape.alone_requests} requests one after another; tok/s best of {self.args.repeats} (median in brackets); "
              f"TTFT median of {shape.ttft_trials}. Every run ran once before timing, so CUDA graphs are captured "
              f"and compilation done in untimed warm-ups (compiled generate: twice, to compile, then to capture)")
        if shape.device != "cuda":
            print("- a CPU smoke run of the code path (--small), not a performance claim")
        print()
        print("| row | run | batch | generated tok/s, best (median) | TTFT ms, median | ratio |")
        print("|---|---|---:|---:|---:|---|")
        for key, row in self.rows.items():
            if "error" in row:
                cells = [f"error: {row['error']}".replace("|", "/"), "-"]
            elif "tok_s" in row:
                cells = [f"{row['tok_s']:.0f} ({row['median_tok_s']:.0f})", "-"]
            else:
                cells = ["-", f"{row['ttft_ms']:.1f}"]
            ratios = [f"{self.ratio(key, ref):.2f}x {ref}" for ref in REFERENCES.get(key, []) if self.ratio(key, ref) is not None]
            print(f"| {key} | {row['label']} | {row['batch']} | {cells[0]} | {cells[1]} | {', '.join(ratios) or '-'} |")
        print()
        for target in self.targets():
            verdict = "not measured" if target["passed"] is None else f"{target['value']:.2f}, {'PASS' if target['passed'] else 'FAIL'}"
            print(f"- target {target['ratio']} >= {target['target']}: {verdict}")


ENGINE_ROWS, GENERATE_ROWS = ["E1", "E2", "E3", "E4", "T1", "T2"], ["G1", "G2", "G3", "G4"]


def engine_rows(report: GpuReport, shape: GpuModeShape, work: Path, texts: list[str], repeats: int) -> None:
    params = {"max_new_tokens": shape.new_tokens, "ignore_eos_token": True}
    adapter_ids = [f"a{i}" for i in range(MIXED_ADAPTERS)]
    mixed = [(t, adapter_ids[i % MIXED_ADAPTERS]) for i, t in enumerate(texts)]
    batches = {"E1": [(t, None) for t in texts], "E2": [(t, adapter_ids[0]) for t in texts], "E3": mixed}
    alone = [(t, adapter_ids[0]) for t in texts[: shape.alone_requests]]
    prompt = long_prompt(shape.long_prompt_tokens)
    engine = None
    try:
        adapter_paths = make_adapters(work / "models" / shape.model_name, work / "adapters", MIXED_ADAPTERS,
                                      base_model_name=shape.model_name)
        engine = InferenceEngine(models_dir=work / "models", device=shape.device, dtype=shape.dtype,
                                 limits=Limits(max_batch_size=shape.requests), default_base_model=shape.model_name)
        for adapter_id, path in zip(adapter_ids, adapter_paths):
            engine.adapter(adapter_id, path)
    except Exception as error:  # noqa: BLE001 - no engine row can run; each says why
        traceback.print_exc()
        report.fail(ENGINE_ROWS, error)
    else:
        for key, items in batches.items():
            report.measure(key, lambda items=items: throughput(lambda: run_batch(engine, items, shape.new_tokens), repeats))
        report.measure("E4", lambda: throughput(lambda: run_sequential(engine, alone, shape.new_tokens), repeats))
        report.measure("T1", lambda: median_first_token_ms(lambda: first_token_alone(
            engine, prompt, params, shape.long_prompt_tokens, adapter_ids[0]), shape.ttft_trials))
        report.measure("T2", lambda: median_first_token_ms(lambda: first_token_under_load(
            engine, prompt, params, shape.long_prompt_tokens, adapter_ids[0], mixed[: shape.requests - 1]), shape.ttft_trials))
    finally:
        if engine is not None:
            engine.close()


def generate_rows(report: GpuReport, shape: GpuModeShape, folder: Path, texts: list[str], repeats: int) -> None:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=shape.dtype).to(shape.device).eval()
    except Exception as error:  # noqa: BLE001 - no generate row can run; each says why
        traceback.print_exc()
        report.fail(GENERATE_ROWS, error)
        return
    # The engine's prompts: bos first; one padded length, so a static cache keeps one shape per batch size.
    with_bos = [tokenizer.bos_token + t for t in texts]
    length = max(len(ids) for ids in tokenizer(with_bos)["input_ids"])

    def encode(batch: list[str]):
        return tokenizer(batch, return_tensors="pt", padding="max_length", max_length=length).to(shape.device)

    inputs = {"batched": [encode(with_bos)], "alone": [encode([t]) for t in with_bos[: shape.alone_requests]]}
    for key, kind in [("G1", "batched"), ("G2", "alone")]:
        report.measure(key, lambda kind=kind: throughput(lambda: generate_seconds(model, inputs[kind], shape.new_tokens), repeats))
    # generate's own compile path: with a static cache it compiles the decode step
    # (reduce-overhead: CUDA graphs); static shapes, so each batch size gets its own graph
    # instead of a recompile with a dynamic batch dimension. The first warm-up compiles,
    # the second records the CUDA graph.
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = CompileConfig(dynamic=False)
    for key, kind in [("G3", "batched"), ("G4", "alone")]:
        report.measure(key, lambda kind=kind: throughput(
            lambda: generate_seconds(model, inputs[kind], shape.new_tokens), repeats, warmups=2))


def gpu_benchmark(args) -> int:
    """Every row of the GPU mode; returns 1 when a row failed (after printing them all)."""
    shape = SMALL_DIMS if args.small else QWEN05_DIMS
    report = GpuReport(shape, args)
    texts = prompts(shape.requests)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        try:
            folder = build_model_folder(shape, work / "models")
        except Exception as error:  # noqa: BLE001 - nothing can run; every row says why
            traceback.print_exc()
            report.fail(ENGINE_ROWS + GENERATE_ROWS, error)
        else:
            engine_rows(report, shape, work, texts, args.repeats)
            # The engine's model and caches leave the GPU before generate's model comes.
            gc.collect()
            if shape.device == "cuda":
                torch.cuda.empty_cache()
            generate_rows(report, shape, folder, texts, args.repeats)
    report.print_markdown()
    return 1 if any("error" in row for row in report.rows.values()) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default: 5; 3 with --gpu)")
    # One torch thread by default: the tiny model's matmuls are too small to split, and on a
    # shared 2-core machine two OpenMP threads spinning against other processes are many times slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="where to build the model and adapters (default: a temp dir)")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers there")
    gpu = parser.add_argument_group("GPU mode (its load is fixed: --requests, --new-tokens, --adapters and --device are not used)")
    gpu.add_argument("--gpu", action="store_true", help="the engine beside transformers' generate, on cuda in bfloat16")
    gpu.add_argument("--small", action="store_true", help="with --gpu: tiny shapes on the CPU in float32, to check the code path")
    args = parser.parse_args()
    if args.small and not args.gpu:
        parser.error("--small goes with --gpu")
    args.repeats = args.repeats or (3 if args.gpu else 5)
    torch.set_num_threads(args.threads)
    if args.gpu:
        sys.exit(gpu_benchmark(args))
    cpu_benchmark(args)


if __name__ == "__main__":
    main()
