"""One adapted layer, forward + backward in training mode: time and saved activations.

    python benchmarks/bench_layer.py [--tokens 2048] [--dim 2048] [--rank 8] [--repeats 15]
                                     [--device cpu] [--dtype float32] [--json PATH]

Compared in the same run, on the same input:
  base         the frozen nn.Linear alone (the floor every adapter pays)
  loop         a per-head loop written like the reference code: h = A x, then for each head
               its own dropout call on h and its own B_i matmul, added to the output one by one
  input-drop   our fused layer with HydraLoRA's dropout on the full-width input x
  ours         our fused R-LoRA layer (multi-head dropout on the rank-r intermediate); on CUDA
               its per-token work runs as Triton kernels (rlora.kernels)
  PyTorch-path the same layer with rlora.kernels off (on a CPU: the same path as ours)
Times are medians. "adapter" columns subtract the base layer's median, so they compare the
adapters' own cost. Saved activations are the bytes autograd keeps for backward beyond the
layer's input and the weights.

``--device cuda --dtype bfloat16`` runs it on a GPU (the layers and the input in that dtype; each
timing synchronises the device before it starts and before it stops). ``--json`` writes the raw
numbers (seconds, bytes; one entry per N), rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rlora import AdapterConfig, kernels  # noqa: E402
from rlora.adapter.layer import RLoRALinear  # noqa: E402

from bench_support import cpu_name, saved_activation_bytes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ReferenceLoopLayer(nn.Module):
    """The computation as the reference code loops it, with the correction folded into W."""

    def __init__(self, fused: RLoRALinear):
        super().__init__()
        self.base_layer = fused.base_layer
        self.lora_A = fused.lora_A
        self.lora_B = nn.ParameterList([nn.Parameter(b.detach().clone()) for b in fused.lora_B])
        self.router = fused.router
        self.scaling, self.dropout = fused.scaling, fused.dropout

    def forward(self, x):
        result = self.base_layer(x)
        h = F.linear(x, self.lora_A)
        weights = torch.softmax(F.linear(x, self.router).float(), -1).to(x.dtype)
        for i, head in enumerate(self.lora_B):
            h_i = F.dropout(h, self.dropout, training=self.training)
            result = result + F.linear(h_i, head) * self.scaling * weights[..., i : i + 1]
        return result


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(layers: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward + backward time of each layer. The layers take turns within every
    repeat, so a burst of load on the machine hits them all alike."""
    out_features = next(iter(layers.values())).base_layer.out_features
    grad = torch.randn(x.shape[:-1] + (out_features,), device=x.device, dtype=x.dtype)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(repeats + 3):
        for name, layer in layers.items():
            synchronize(x.device)
            start = time.perf_counter()
            layer(x).backward(grad)
            synchronize(x.device)
            elapsed = time.perf_counter() - start
            if i >= 3:
                times[name].append(elapsed)
            x.grad = None
            layer.zero_grad(set_to_none=True)
    return {name: statistics.median(values) for name, values in times.items()}


def adapter_ratio(t_ours: float, t_other: float, t_base: float) -> float:
    """``ours / other`` of the adapters' own time (the base layer's subtracted from both)."""
    return (t_ours - t_base) / (t_other - t_base) if t_other != t_base else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--heads", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the layers and the input")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers there (rewritten after every row)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")

    torch.manual_seed(0)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# bench_layer {time.strftime('%Y-%m-%d')}: d={args.dim}, r={args.rank}, tokens={args.tokens}, dropout={args.dropout}, "
          f"{args.dtype} on {device}, {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print()
    print("| N | base ms | loop ms | input-drop ms | ours ms | PyTorch-path ms | ours/base | ours/loop | ours/loop (adapter) "
          "| ours/input-drop (adapter) | ours/PyTorch-path | saved: ours | saved: input-drop | saved: loop | saved ours/input-drop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    raw = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": str(device), "machine": machine, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/bench_layer.py", *sys.argv[1:]]),
        "tokens": args.tokens, "dim": args.dim, "rank": args.rank, "dropout": args.dropout, "repeats": args.repeats,
        "rows": [],
    }
    base = nn.Linear(args.dim, args.dim, device=device, dtype=dtype)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    for heads in args.heads:
        def layer(method):
            config = AdapterConfig(method=method, heads=heads, rank=args.rank, dropout=args.dropout)
            return RLoRALinear(base, config, torch.Generator().manual_seed(0)).to(dtype).train()

        ours, input_drop = layer("rlora"), layer("hydralora")
        loop = ReferenceLoopLayer(ours).train()
        layers = {"base": _Frozen(base), "loop": loop, "input": input_drop, "ours": ours, "torch": _PyTorchPath(ours)}
        t = median_seconds(layers, x, args.repeats)
        t_base, t_loop, t_input, t_ours, t_torch = t["base"], t["loop"], t["input"], t["ours"], t["torch"]
        saved = {name: saved_activation_bytes(lambda m=m: m(x), [x, *m.parameters(), *m.buffers()])
                 for name, m in [("ours", ours), ("input", input_drop), ("loop", loop)]}
        print(
            f"| {heads} | {t_base * 1e3:.1f} | {t_loop * 1e3:.1f} | {t_input * 1e3:.1f} | {t_ours * 1e3:.1f} | {t_torch * 1e3:.1f} "
            f"| {t_ours / t_base:.3f} | {t_ours / t_loop:.3f} | {adapter_ratio(t_ours, t_loop, t_base):.3f} "
            f"| {adapter_ratio(t_ours, t_input, t_base):.3f} | {t_ours / t_torch:.3f} "
            f"| {saved['ours'] / 2**20:.2f} MiB | {saved['input'] / 2**20:.2f} MiB | {saved['loop'] / 2**20:.2f} MiB "
            f"| {saved['ours'] / saved['input']:.3f} |",
            flush=True,
        )
        raw["rows"].append({
            "heads": heads,
            "median_s": {"base": t_base, "loop": t_loop, "input_drop": t_input, "ours": t_ours, "pytorch_path": t_torch},
            "saved_bytes": {"ours": saved["ours"], "input_drop": saved["input"], "loop": saved["loop"]},
        })
        if args.json:
            Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")


class _PyTorchPath(nn.Module):
    """Our layer with rlora.kernels off: on CUDA, what its Triton kernels replace."""

    def __init__(self, layer: RLoRALinear):
        super().__init__()
        self.layer = layer
        self.base_layer = layer.base_layer

    def forward(self, x):
        with kernels.backend("torch"):  # the function records its path at forward: backward follows
            return self.layer(x)


class _Frozen(nn.Module):
    """The base layer alone, with the same interface as the adapters for timing."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base.requires_grad_(False)

    def forward(self, x):
        return self.base_layer(x)


if __name__ == "__main__":
    main()
