"""One adapted layer, forward + backward in training mode: time and saved activations.

    python benchmarks/bench_layer.py [--tokens 2048] [--dim 2048] [--rank 8] [--repeats 15]

Compared in the same run, on the same input:
  base         the frozen nn.Linear alone (the floor every adapter pays)
  loop         a per-head loop written like the reference code: h = A x, then for each head
               its own dropout call on h and its own B_i matmul, added to the output one by one
  input-drop   our fused layer with HydraLoRA's dropout on the full-width input x
  ours         our fused R-LoRA layer (multi-head dropout on the rank-r intermediate)
Times are medians. "adapter" columns subtract the base layer's median, so they compare the
adapters' own cost. Saved activations are the bytes autograd keeps for backward beyond the
layer's input and the weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rlora import AdapterConfig  # noqa: E402
from rlora.adapter.layer import RLoRALinear  # noqa: E402

from bench_support import saved_activation_bytes  # noqa: E402


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


def median_seconds(layers: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward + backward time of each layer. The layers take turns within every
    repeat, so a burst of load on the machine hits them all alike."""
    grad = torch.randn(x.shape[:-1] + (next(iter(layers.values())).base_layer.out_features,))
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(repeats + 3):
        for name, layer in layers.items():
            start = time.perf_counter()
            layer(x).backward(grad)
            elapsed = time.perf_counter() - start
            if i >= 3:
                times[name].append(elapsed)
            x.grad = None
            layer.zero_grad(set_to_none=True)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--heads", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"# bench_layer {time.strftime('%Y-%m-%d')}: d={args.dim}, r={args.rank}, tokens={args.tokens}, dropout={args.dropout}, "
          f"float32, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print()
    print("| N | base ms | loop ms | input-drop ms | ours ms | ours/base | ours/loop | ours/loop (adapter) "
          "| ours/input-drop (adapter) | saved: ours | saved: input-drop | saved: loop | saved ours/input-drop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = nn.Linear(args.dim, args.dim)
    x = torch.randn(args.tokens, args.dim, requires_grad=True)
    for heads in args.heads:
        def layer(method):
            config = AdapterConfig(method=method, heads=heads, rank=args.rank, dropout=args.dropout)
            return RLoRALinear(base, config, torch.Generator().manual_seed(0)).train()

        ours, input_drop = layer("rlora"), layer("hydralora")
        loop = ReferenceLoopLayer(ours).train()
        t = median_seconds({"base": _Frozen(base), "loop": loop, "input": input_drop, "ours": ours}, x, args.repeats)
        t_base, t_loop, t_input, t_ours = t["base"], t["loop"], t["input"], t["ours"]
        saved = {name: saved_activation_bytes(lambda m=m: m(x), [x, *m.parameters(), *m.buffers()])
                 for name, m in [("ours", ours), ("input", input_drop), ("loop", loop)]}
        print(
            f"| {heads} | {t_base * 1e3:.1f} | {t_loop * 1e3:.1f} | {t_input * 1e3:.1f} | {t_ours * 1e3:.1f} "
            f"| {t_ours / t_base:.3f} | {t_ours / t_loop:.3f} | {(t_ours - t_base) / (t_loop - t_base):.3f} "
            f"| {(t_ours - t_base) / (t_input - t_base):.3f} "
            f"| {saved['ours'] / 2**20:.2f} MiB | {saved['input'] / 2**20:.2f} MiB | {saved['loop'] / 2**20:.2f} MiB "
            f"| {saved['ours'] / saved['input']:.3f} |"
        )


class _Frozen(nn.Module):
    """The base layer alone, with the same interface as the adapters for timing."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base.requires_grad_(False)

    def forward(self, x):
        return self.base_layer(x)


if __name__ == "__main__":
    main()
