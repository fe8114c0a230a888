"""A whole model's training step with each adapter, presented as the paper's Table 4 (issue 12).

    PYTHONPATH=. python3 benchmarks/bench_train.py --model qwen2.5-0.5b --compile [--json PATH]
    PYTHONPATH=. python3 benchmarks/bench_train.py --model qwen2.5-3b --compile [--json PATH]
    python3 benchmarks/bench_train.py --small [--json PATH]      (CPU, tiny shapes: the code path)

The model is a Qwen2 built from a config with Qwen2.5-0.5B's or Qwen2.5-3B's dimensions and
random weights (nothing is downloaded): bfloat16 weights, float32 adapter parameters and bf16
autocast on CUDA. Adapters on gate/up/down, alpha 32, dropout 0.2. A step is forward + loss +
backward + AdamW step on the adapter's parameters; the frozen model alone (no adapter, input
gradients only, no optimizer) is the floor every adapter pays. Variants, in one run:

  frozen          the frozen model alone
  peft-lora-r10   PEFT LoRA r=10: the paper's LoRA*2, about the trainable parameters of N=3 r=4
  lora-r10        ours, lora r=10
  hydralora-N3    ours, hydralora N=3 r=4 (dropout on the input)
  rlora-N3        ours, rlora N=3 r=4 (multi-head dropout, MD)
  rlora-noMD-N3   ours, rlora without MD (dropout on the input, ID)
  loop-MD-N3      a per-head loop written like the reference code: h = A x, then for each head
                  its own dropout call on h and its own B_i matmul, added one by one
  loop-ID-N3      the same loop with each head's dropout on the input x and its own A matmul
  rlora-N5, rlora-noMD-N5, loop-MD-N5, loop-ID-N5   the same at N=5
  rlora-N3-torch  ours, rlora N=3 r=4 on the PyTorch path (rlora.kernels off): what the Triton
                  kernels of the adapter's per-token work (on CUDA by default) give
  frozen-liger, peft-lora-r10-liger, rlora-N3-liger   with ``--base-kernels``: the frozen model,
                  PEFT LoRA and rlora with Liger-kernel's RMSNorm, SwiGLU, RoPE and fused linear
                  cross-entropy on the base model (CUDA only; Liger patches the model type's
                  functions for the process, so these run last)

The loops are this file's own layers around the frozen linears (no frozen correction: the
reference code folds its initial update into W), so they do not depend on how our layer is
written. Each variant runs eager, and with ``--compile`` also with every decoder layer compiled
on its own (``layer.compile()``, regional compilation); on CUDA only (compiling takes about 50 s
per variant even at ``--small``'s shapes on a 2-core CPU, so the CPU's compiled cells say so).
Times are medians over ``--steps`` steps after ``--warmup`` untimed ones (compilation happens
there). Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over the steps (weights,
optimizer state and activations); on the CPU the bytes autograd saves for backward in one
forward, measured with ``torch.autograd.graph.saved_tensors_hooks`` (distinct storages, the
parameters and buffers not counted). A variant that fails shows its error in its row and the
others still run (exit status 1). Prints a markdown table with date, device, versions and
command; ``--json`` writes the raw numbers after every row.

Targets (issue 21, on an H100 or H200): rlora N=3 r=4 step <= 1.15x the frozen model's with the
same base kernels (Liger's where measured) in the same mode, on the 0.5B shape at 8 x 1024
tokens; rlora N=3 r=4 (with Liger where measured) <= 0.6x PEFT LoRA r=10's step as a user runs
it (transformers + PEFT) and <= 0.6x its memory; multi-head dropout against input dropout at
N=3 (the paper's Table 4) <= 0.85x the time and <= 0.75x the memory.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import gc
import json
import math
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rlora  # noqa: E402
from rlora import AdapterConfig, kernels  # noqa: E402

from bench_support import cpu_name, saved_activation_bytes  # noqa: E402

TARGETS = ("gate_proj", "up_proj", "down_proj")
ALPHA, DROPOUT = 32.0, 0.2
STEP_TARGET_VS_FROZEN, STEP_TARGET_VS_PEFT, MEMORY_TARGET_VS_PEFT = 1.15, 0.6, 0.6
MD_VS_ID_TIME, MD_VS_ID_MEMORY = 0.85, 0.75
PAPER_TABLE4 = "the paper's Table 4: MD / ID 0.91x the time and 0.79x the memory"


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    layers: int
    attention_heads: int
    kv_heads: int
    vocab_size: int
    batch: int
    tokens: int


MODELS = {
    "qwen2.5-0.5b": ModelShape("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, batch=8, tokens=1024),
    "qwen2.5-3b": ModelShape("qwen2.5-3b", 2048, 11008, 36, 16, 2, 151936, batch=4, tokens=1024),
}
SMALL = ModelShape("small", 64, 176, 2, 4, 2, 256, batch=2, tokens=64)
# The first target is defined on this shape and load.
FROZEN_TARGET_SHAPE = ("qwen2.5-0.5b", 8, 1024)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    kind: str  # "frozen", "peft", "ours" or "loop"
    heads: int = 1
    rank: int = 4
    settings: dict = field(default_factory=dict)  # AdapterConfig settings of "ours"
    input_dropout: bool = False  # for "loop": each head's dropout on x rather than on h
    kernels: str = "auto"  # rlora.kernels' backend: auto (Triton on CUDA) or torch
    liger: bool = False  # Liger-kernel on the base model


def _n_heads_variants(n: int) -> list[Variant]:
    return [
        Variant(f"rlora-N{n}", f"ours, rlora N={n} r=4 (MD)", "ours", n, settings=dict(method="rlora")),
        Variant(f"rlora-noMD-N{n}", f"ours, rlora without MD N={n} r=4 (ID)", "ours", n,
                settings=dict(method="rlora", multi_head_dropout=False)),
        Variant(f"loop-MD-N{n}", f"reference-style per-head loop, MD, N={n} r=4", "loop", n),
        Variant(f"loop-ID-N{n}", f"reference-style per-head loop, ID, N={n} r=4", "loop", n, input_dropout=True),
    ]


VARIANTS = [
    Variant("frozen", "frozen model alone (input gradients only)", "frozen"),
    Variant("peft-lora-r10", "PEFT LoRA r=10 (the paper's LoRA*2)", "peft", rank=10),
    Variant("lora-r10", "ours, lora r=10", "ours", rank=10, settings=dict(method="lora")),
    Variant("hydralora-N3", "ours, hydralora N=3 r=4 (ID)", "ours", 3, settings=dict(method="hydralora")),
    *_n_heads_variants(3),
    *_n_heads_variants(5),
    Variant("rlora-N3-torch", "ours, rlora N=3 r=4 (MD), PyTorch path (kernels off)", "ours", 3,
            settings=dict(method="rlora"), kernels="torch"),
    # Liger patches the model type's functions for the whole process: these come last.
    Variant("frozen-liger", "frozen model alone + Liger", "frozen", liger=True),
    Variant("peft-lora-r10-liger", "PEFT LoRA r=10 + Liger", "peft", rank=10, liger=True),
    Variant("rlora-N3-liger", "ours, rlora N=3 r=4 (MD) + Liger", "ours", 3, settings=dict(method="rlora"), liger=True),
]
BASELINES = ("frozen", "peft-lora-r10")
LIGER_VARIANTS = tuple(v.key for v in VARIANTS if v.liger)
MODES = ("eager", "compiled")


class ReferenceLoopLinear(nn.Module):
    """A frozen linear with the R-LoRA computation as the reference code loops it: per head its
    own dropout call and its own B_i matmul, added to the output one by one. Its parameters have
    our layer's shapes (A, N heads B_i, a router), started as R-LoRA starts them."""

    def __init__(self, base_layer: nn.Linear, heads: int, rank: int, input_dropout: bool, generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        d_out, d_in = base_layer.out_features, base_layer.in_features  # a 4-bit weight is stored packed
        config = AdapterConfig(method="rlora", heads=heads, rank=rank, alpha=ALPHA, dropout=DROPOUT)
        scale = config.head_init_scale(d_out)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter((torch.randn(rank, d_in, generator=generator) * scale / math.sqrt(d_in)).to(device))
        self.lora_B = nn.ParameterList(
            nn.Parameter((torch.randn(d_out, rank, generator=generator) * scale / math.sqrt(d_out)).to(device))
            for _ in range(heads)
        )
        self.router = nn.Parameter(torch.zeros(heads, d_in, device=device))
        self.scaling, self.input_dropout = config.scaling, input_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        weights = torch.softmax(F.linear(x, self.router).float(), -1).to(result.dtype)
        h = None if self.input_dropout else F.linear(x, self.lora_A)
        for i, head in enumerate(self.lora_B):
            if self.input_dropout:
                h_i = F.linear(F.dropout(x, DROPOUT, self.training), self.lora_A)
            else:
                h_i = F.dropout(h, DROPOUT, self.training)
            result = result + F.linear(h_i, head) * self.scaling * weights[..., i : i + 1]
        return result


def attach_loops(model: nn.Module, variant: Variant) -> None:
    generator = torch.Generator().manual_seed(0)
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rpartition(".")[2] in TARGETS]
    model.requires_grad_(False)
    for path in targets:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, child, ReferenceLoopLinear(getattr(parent, child), variant.heads, variant.rank,
                                                   variant.input_dropout, generator))


def build_model(shape: ModelShape, device: str, dtype: torch.dtype, quantization: str = "none") -> nn.Module:
    """A Qwen2 causal LM with ``shape``'s dimensions and random weights, the same for every
    variant (seeded); with ``quantization`` its linear layers loaded through bitsandbytes
    (`rlora.quantization`) from a folder the random weights are saved to once."""
    if quantization != "none":
        from rlora.basemodels import load_base_model

        model, _ = load_base_model(_saved_random_model(shape, dtype), dtype=dtype, device=device, quantization=quantization)
        return model
    return _random_model(shape, device, dtype)


@functools.lru_cache(maxsize=1)
def _saved_random_model(shape: ModelShape, dtype: torch.dtype) -> str:
    folder = tempfile.mkdtemp(prefix=f"bench-train-{shape.name}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _random_model(shape, "cpu", dtype).save_pretrained(folder)
    return folder


def _random_model(shape: ModelShape, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers, num_attention_heads=shape.attention_heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(4096, shape.tokens), tie_word_embeddings=True, rope_theta=1e6,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def with_adapter(model: nn.Module, variant: Variant) -> nn.Module:
    """``model`` with ``variant``'s adapter, in training mode; adapter parameters in float32."""
    if variant.liger:  # on the base model, before any adapter wraps its linears
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    if variant.kind == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward runs through every layer, as with an adapter
    elif variant.kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=variant.rank, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                 target_modules=list(TARGETS)))
    elif variant.kind == "ours":
        rlora.attach(model, AdapterConfig(heads=variant.heads, rank=variant.rank, alpha=ALPHA, dropout=DROPOUT,
                                          target_modules=TARGETS, **variant.settings))
    else:
        attach_loops(model, variant)
    for param in trainable(model):
        param.data = param.data.float()
    return model.train()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Trainer:
    """Training steps of one model: forward + loss + backward + AdamW on its trainable parameters."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, device: str):
        self.model, self.input_ids, self.device = model, input_ids, device
        params = trainable(model)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def forward(self) -> torch.Tensor:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            return self.model(input_ids=self.input_ids, labels=self.input_ids).loss

    def step(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.forward().backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start

    def measure(self, warmup: int, steps: int) -> dict:
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            self.step()
        times = [self.step() for _ in range(steps)]
        if self.device == "cuda":
            memory = torch.cuda.max_memory_allocated()
        else:
            memory = saved_activation_bytes(self.forward, [*self.model.parameters(), *self.model.buffers()])
        return {"step_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
                "all_ms": [1000 * t for t in times], "memory_bytes": memory}


def compile_regionally(decoder_layers: list[nn.Module]) -> None:
    # A fresh dynamo cache per variant: the decoder layers of every variant share one code
    # object, and past the recompile limit dynamo would silently run them eager.
    torch._dynamo.reset()
    for layer in decoder_layers:
        layer.compile()


class Report:
    """Rows measured one by one: a cell that fails keeps its error and the others go on."""

    def __init__(self, args, shape: ModelShape, device: str, dtype: torch.dtype, variants: list[Variant]):
        import peft
        import transformers

        self.args, self.shape, self.device, self.dtype = args, shape, device, dtype
        self.variants = variants
        self.rows: dict[str, dict] = {v.key: {"label": v.label, "trainable": None} for v in variants}
        self.environment = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(),
            "command": shlex.join(["python3", "benchmarks/bench_train.py", *sys.argv[1:]]),
        }

    @property
    def memory_name(self) -> str:
        return "peak GiB" if self.device == "cuda" else "saved MiB"

    def record(self, key: str, mode: str, result: dict) -> None:
        self.rows[key][mode] = result
        print(f"{key} {mode}: {result}", file=sys.stderr, flush=True)
        self.write_json()

    def value(self, key: str, mode: str, metric: str) -> float | None:
        return self.rows.get(key, {}).get(mode, {}).get(metric)

    def ratio(self, key: str, reference: str, mode: str, metric: str = "step_ms") -> float | None:
        value, base = self.value(key, mode, metric), self.value(reference, mode, metric)
        return value / base if value is not None and base else None

    def targets(self) -> list[dict]:
        shape_note = None
        if (self.shape.name, self.args.batch, self.args.tokens) != FROZEN_TARGET_SHAPE:
            shape_note = "defined on qwen2.5-0.5b at 8 x 1024 tokens; this run's shape is informative only"
        targets = []
        for mode in MODES:
            # The frozen model with the same base kernels as ours (Liger's where both ran).
            liger = self.value("rlora-N3-liger", mode, "step_ms") is not None and self.value("frozen-liger", mode, "step_ms") is not None
            ours, frozen = ("rlora-N3-liger", "frozen-liger") if liger else ("rlora-N3", "frozen")
            best = "rlora-N3-liger" if self.value("rlora-N3-liger", mode, "step_ms") is not None else "rlora-N3"
            kernels = " (both with Liger)" if liger else ""
            best_name = "rlora N=3 r=4" + (" + Liger" if best != "rlora-N3" else "")
            for text, key, reference, metric, limit, note in [
                (f"rlora N=3 r=4 step / frozen model's step{kernels}", ours, frozen, "step_ms", STEP_TARGET_VS_FROZEN, shape_note),
                (f"{best_name} step / PEFT LoRA's step as a user runs it", best, "peft-lora-r10", "step_ms", STEP_TARGET_VS_PEFT, None),
                (f"{best_name} memory / PEFT LoRA's as a user runs it ({self.memory_name})", best, "peft-lora-r10", "memory_bytes",
                 MEMORY_TARGET_VS_PEFT, None),
                ("MD / ID step at N=3 (ours)", "rlora-N3", "rlora-noMD-N3", "step_ms", MD_VS_ID_TIME, None),
                (f"MD / ID memory at N=3 (ours, {self.memory_name})", "rlora-N3", "rlora-noMD-N3", "memory_bytes", MD_VS_ID_MEMORY, None),
            ]:
                value = self.ratio(key, reference, mode, metric)
                targets.append({"target": f"{text}, {mode}", "limit": limit, "value": value, "note": note,
                                "passed": None if value is None else value <= limit})
        return targets

    def table4(self) -> list[dict]:
        """MD against ID (ours and the loops) and ours against the loop, at 3 and 5 heads."""
        rows = []
        for heads in (3, 5):
            for mode in MODES:
                pairs = {"ours MD / ID": (f"rlora-N{heads}", f"rlora-noMD-N{heads}"),
                         "loop MD / ID": (f"loop-MD-N{heads}", f"loop-ID-N{heads}"),
                         "ours MD / loop MD": (f"rlora-N{heads}", f"loop-MD-N{heads}")}
                rows.append({"heads": heads, "mode": mode, **{
                    name: {"time": self.ratio(a, b, mode), "memory": self.ratio(a, b, mode, "memory_bytes")}
                    for name, (a, b) in pairs.items()}})
        return rows

    def write_json(self) -> None:
        if self.args.json:
            raw = {**self.environment, "shape": asdict(self.shape), "batch": self.args.batch, "tokens": self.args.tokens,
                   "dtype": str(self.dtype), "memory": self.memory_name, "warmup": self.args.warmup,
                   "steps": self.args.steps, "rows": self.rows, "targets": self.targets(), "table4": self.table4()}
            Path(self.args.json).write_text(json.dumps(raw, indent=1) + "\n")

    def cells(self, key: str, mode: str) -> list[str]:
        """step ms, memory, x frozen, x PEFT (time / memory) of one row in one mode."""
        result = self.rows[key].get(mode, {})
        if "error" in result:
            return [f"error: {result['error']}".replace("|", "/"), "-", "-", "-"]
        if "not_run" in result:
            return [result["not_run"], "-", "-", "-"]
        scale = 2**30 if self.device == "cuda" else 2**20
        frozen = "frozen-liger" if key in LIGER_VARIANTS else "frozen"  # the floor with the same base kernels
        to_frozen = self.ratio(key, frozen, mode)
        to_peft = self.ratio(key, "peft-lora-r10", mode), self.ratio(key, "peft-lora-r10", mode, "memory_bytes")
        return [f"{result['step_ms']:.1f}", f"{result['memory_bytes'] / scale:.2f}",
                "-" if key == frozen or to_frozen is None else f"{to_frozen:.2f}x",
                "-" if key in BASELINES or None in to_peft else f"{to_peft[0]:.2f}x / {to_peft[1]:.2f}x"]

    def print_markdown(self) -> None:
        env, shape, args = self.environment, self.shape, self.args
        print(f"## bench_train ({env['date']})\n")
        print(f"- device: {env['device']} ({self.device}, {str(self.dtype).removeprefix('torch.')} weights"
              + (", float32 adapters, bf16 autocast)" if self.device == "cuda" else ")"))
        print(f"- torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, python {env['python']}")
        print(f"- command: `{env['command']}`")
        print(f"- model: Qwen2 with {shape.name}'s dimensions (hidden {shape.hidden_size}, intermediate "
              f"{shape.intermediate_size}, {shape.layers} layers, {shape.attention_heads} heads, {shape.kv_heads} KV heads, "
              f"vocabulary {shape.vocab_size}), random weights; adapters on {'/'.join(TARGETS)}, alpha {ALPHA:g}, "
              f"dropout {DROPOUT}; {args.batch} x {args.tokens} tokens"
              + (f"; every variant's base quantized to {args.quantization} (bitsandbytes)" if args.quantization != "none" else ""))
        print(f"- step: forward + loss + backward + AdamW on the adapter (the frozen model: no optimizer); median of "
              f"{args.steps} steps after {args.warmup} untimed; compiled: every decoder layer compiled on its own")
        if self.device == "cuda":
            print("- memory: peak torch.cuda.max_memory_allocated over the steps (weights, optimizer state, activations)")
        else:
            print("- memory: bytes autograd saves for backward in one forward (saved_tensors_hooks; parameters and "
                  "buffers not counted), not a peak")
            print("- a CPU smoke run of the code path, not a performance claim")
        print()
        mem = self.memory_name
        print("x frozen: against the frozen model with the same base kernels; x PEFT: against PEFT LoRA r=10 as a user "
              "runs it (transformers + PEFT)\n")
        print(f"| variant | trainable params | eager ms | eager {mem} | eager x frozen | eager x PEFT (time / memory) "
              f"| compiled ms | compiled {mem} | compiled x frozen | compiled x PEFT (time / memory) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key, row in self.rows.items():
            count = "-" if row["trainable"] is None else f"{row['trainable']:,}"
            cells = [c for mode in MODES for c in self.cells(key, mode)]
            print(f"| {row['label']} | {count} | {' | '.join(cells)} |")
        print()
        self.print_parameter_check()
        print(f"\nMD against ID and ours against the loop ({PAPER_TABLE4}); ratios of step time and of {mem}:\n")
        print("| heads | mode | ours MD / ID | loop MD / ID | ours MD / loop MD |")
        print("|---:|---|---:|---:|---:|")
        for row in self.table4():
            ratios = [row[name] for name in ("ours MD / ID", "loop MD / ID", "ours MD / loop MD")]
            print(f"| {row['heads']} | {row['mode']} | "
                  + " | ".join(format_pair(r["time"], r["memory"]) for r in ratios) + " |")
        print()
        for target in self.targets():
            verdict = ("not measured" if target["passed"] is None
                       else f"{target['value']:.2f}, {'PASS' if target['passed'] else 'FAIL'}")
            note = f" ({target['note']})" if target["note"] else ""
            print(f"- target {target['target']} <= {target['limit']}: {verdict}{note}")

    def print_parameter_check(self) -> None:
        peft_count, ours_count = (self.rows.get(key, {}).get("trainable") for key in ("peft-lora-r10", "rlora-N3"))
        if peft_count and ours_count:
            print(f"Trainable parameters: PEFT LoRA r=10 {peft_count:,}, rlora N=3 r=4 {ours_count:,} "
                  f"(ratio {ours_count / peft_count:.3f}; the paper's LoRA*2 matches them approximately).")


def format_pair(time_ratio: float | None, memory_ratio: float | None) -> str:
    if time_ratio is None or memory_ratio is None:
        return "not measured"
    return f"{time_ratio:.2f}x / {memory_ratio:.2f}x"


def measure_variant(report: Report, variant: Variant, args, compile_skip: str | None) -> None:
    """Both modes of one variant on one model: eager first, then the same model compiled."""
    shape, device, dtype = report.shape, report.device, report.dtype
    if variant.liger and device != "cuda":
        for mode in MODES:
            report.record(variant.key, mode, {"not_run": "Liger needs CUDA"})
        return
    with kernels.backend(variant.kernels):
        _measure_variant(report, variant, args, compile_skip)


def _measure_variant(report: Report, variant: Variant, args, compile_skip: str | None) -> None:
    shape, device, dtype = report.shape, report.device, report.dtype
    model = trainer = None
    try:
        model = build_model(shape, device, dtype, args.quantization)
        decoder_layers = list(model.model.layers)
        model = with_adapter(model, variant)
        report.rows[variant.key]["trainable"] = sum(p.numel() for p in trainable(model))
        input_ids = torch.randint(0, shape.vocab_size, (args.batch, args.tokens), device=device,
                                  generator=torch.Generator(device).manual_seed(0))
        trainer = Trainer(model, input_ids, device)
    except Exception as error:  # noqa: BLE001 - the row shows it; the other rows still run
        traceback.print_exc()
        for mode in MODES:
            report.record(variant.key, mode, {"error": repr(error)})
        return
    for mode in MODES:
        if mode == "compiled" and compile_skip:
            report.record(variant.key, mode, {"not_run": compile_skip})
            continue
        try:
            if mode == "compiled":
                compile_regionally(decoder_layers)
            result = trainer.measure(args.warmup, args.steps)
        except Exception as error:  # noqa: BLE001 - the cell shows it; the others still run
            traceback.print_exc()
            result = {"error": repr(error)}
        report.record(variant.key, mode, result)
    del model, trainer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU in float32 (hidden 64, 2 layers)")
    parser.add_argument("--compile", action="store_true", help="also time every variant with its decoder layers compiled")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the model's)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default: the model's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and mode")
    parser.add_argument("--variants", nargs="+", choices=[v.key for v in VARIANTS], default=None,
                        help="run only these (the frozen model and PEFT LoRA always run: the ratios need them)")
    parser.add_argument("--base-kernels", action="store_true",
                        help="also the Liger rows (frozen, PEFT LoRA, rlora N=3 with Liger-kernel on the base model; CUDA)")
    parser.add_argument("--quantization", choices=["none", "nf4", "int8"], default="none",
                        help="every variant's frozen base through bitsandbytes (QLoRA: nf4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers there")
    args = parser.parse_args()

    shape = SMALL if args.small else MODELS[args.model]
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.batch, args.tokens = args.batch or shape.batch, args.tokens or shape.tokens
    if device == "cpu":
        torch.set_num_threads(args.threads)
    wanted = set(args.variants or [v.key for v in VARIANTS if not v.liger]) | set(BASELINES)
    if args.base_kernels:
        wanted |= set(LIGER_VARIANTS)
    if wanted & set(LIGER_VARIANTS):
        wanted.add("frozen-liger")  # the same base kernels' floor
    variants = [v for v in VARIANTS if v.key in wanted]
    if device == "cpu":
        # Even --small's tiny shapes take about 50 s per variant to compile on 2 cores.
        compile_skip = "not run on CPU"
    elif not args.compile:
        compile_skip = "not run (no --compile)"
    else:
        compile_skip = None

    report = Report(args, shape, device, dtype, variants)
    for variant in variants:
        measure_variant(report, variant, args, compile_skip)
    report.print_markdown()
    failed = any("error" in row.get(mode, {}) for row in report.rows.values() for mode in MODES)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
