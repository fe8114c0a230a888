"""Memory of a training run by the estimate the service places jobs with (rlora.training.memory),
and, on a GPU, beside the peak a step measures (issue 22).

The estimate table needs no weights: every model is built on the meta device from a config of
its real dimensions (Qwen2.5-0.5B, 3B, 7B, Llama-3-8B, Llama-3-70B), nothing downloaded. For each
it gives the estimate of an R-LoRA job (N=3, r=8 on gate/up/down, 4 x 1024 tokens) in bfloat16
and over an NF4 base, with and without gradient checkpointing, and which devices of 24, 80 and
141 GB it fits; then the largest shape each fits.

``--measure`` (CUDA): the 0.5B and 3B shapes with random weights, one training step each in
bfloat16 and over NF4, ``torch.cuda.max_memory_allocated`` beside the estimate.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlora import AdapterConfig  # noqa: E402
from rlora.training.config import TrainingSettings  # noqa: E402
from rlora.training.memory import estimate_training_memory  # noqa: E402

GB = 10**9
CAPACITIES = (24 * GB, 80 * GB, 141 * GB)
ADAPTER = AdapterConfig(method="rlora", heads=3, rank=8)
BATCH, TOKENS = 4, 1024


def shapes() -> dict:
    from transformers import LlamaConfig, Qwen2Config

    return {
        "Qwen2.5-0.5B": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "Qwen2.5-3B": Qwen2Config(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "Qwen2.5-7B": Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                  num_key_value_heads=4, vocab_size=152064),
        "Llama-3-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                  num_key_value_heads=8, vocab_size=128256),
        "Llama-3-70B": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                                   num_key_value_heads=8, vocab_size=128256),
    }


def meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def settings(quantization: str, checkpointing: bool, batch: int = BATCH, tokens: int = TOKENS) -> TrainingSettings:
    return TrainingSettings(max_steps=1, batch_size=batch, max_seq_len=tokens, quantization=quantization,
                            gradient_checkpointing=checkpointing)


FORMS = [("bfloat16", "none", False), ("bfloat16 + ckpt", "none", True), ("nf4", "nf4", False), ("nf4 + ckpt", "nf4", True)]


def estimate_table() -> tuple[str, list[dict]]:
    rows = []
    for name, config in shapes().items():
        model = meta_model(config)
        for label, quantization, checkpointing in FORMS:
            estimate = estimate_training_memory(model, ADAPTER, settings(quantization, checkpointing), on_cuda=True)
            rows.append({"model": name, "form": label, **estimate.as_dict()})
    lines = ["| model | form | weights GiB | adapter + optimizer GiB | activations GiB | logits GiB | total GiB | fits 24 / 80 / 141 GB |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        fits = " / ".join("yes" if row["total"] <= capacity else "no" for capacity in CAPACITIES)
        lines.append(f"| {row['model']} | {row['form']} | " + " | ".join(f"{row[k] / 2**30:.1f}" for k in
                     ("weights", "adapter", "activations", "logits", "total")) + f" | {fits} |")
    lines += ["", "| device | largest shape that fits, bfloat16 (with checkpointing) | largest, nf4 (with checkpointing) |", "|---|---|---|"]
    order = list(shapes())
    for capacity in CAPACITIES:
        best = {}
        for form in ("bfloat16 + ckpt", "nf4 + ckpt"):
            fitting = [r["model"] for r in rows if r["form"] == form and r["total"] <= capacity]
            best[form] = max(fitting, key=order.index) if fitting else "none"
        lines.append(f"| {capacity // GB} GB | {best['bfloat16 + ckpt']} | {best['nf4 + ckpt']} |")
    return "\n".join(lines), rows


def measure_table() -> tuple[str, list[dict]]:
    """One step of each shape, in bfloat16 and over NF4, on CUDA: the measured peak beside the estimate."""
    import rlora
    from rlora.basemodels import load_base_model
    from rlora.training.base_kernels import answer_loss_sum
    from transformers import AutoModelForCausalLM

    rows = []
    for name in ("Qwen2.5-0.5B", "Qwen2.5-3B"):
        config = shapes()[name]
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
            for quantization in ("none", "nf4"):
                row = {"model": name, "form": "bfloat16" if quantization == "none" else "nf4"}
                try:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    model, _ = load_base_model(folder, dtype=torch.bfloat16, device="cuda", quantization=quantization)
                    rlora.attach(model, ADAPTER)
                    model.train()
                    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
                    ids = torch.randint(0, config.vocab_size, (BATCH, TOKENS), device="cuda")
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = answer_loss_sum(model, ids, torch.ones_like(ids), ids.clone())
                    loss.backward()
                    optimizer.step()
                    row["measured"] = torch.cuda.max_memory_allocated()
                    del model, optimizer, loss
                except Exception as err:  # noqa: BLE001 - a failing row prints its error
                    row["error"] = f"{type(err).__name__}: {err}"[:200]
                row["estimate"] = estimate_training_memory(meta_model(config), ADAPTER, settings(quantization, False), on_cuda=True).total
                rows.append(row)
    lines = ["| model | form | measured peak GiB | estimate GiB | estimate / measured |", "|---|---|---:|---:|---:|"]
    for row in rows:
        if "measured" in row:
            lines.append(f"| {row['model']} | {row['form']} | {row['measured'] / 2**30:.2f} | {row['estimate'] / 2**30:.2f} | "
                         f"{row['estimate'] / row['measured']:.2f} |")
        else:
            lines.append(f"| {row['model']} | {row['form']} | failed: {row['error']} | {row['estimate'] / 2**30:.2f} | |")
    return "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also measure one step of the 0.5B and 3B shapes (CUDA)")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers there")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"## bench_memory ({started})\n")
    print(f"R-LoRA N=3 r=8 on gate/up/down, {BATCH} x {TOKENS} tokens a step, AdamW; estimates for CUDA (bfloat16 "
          f"compute); torch {torch.__version__}, python {platform.python_version()}\n")
    table, rows = estimate_table()
    print(table)
    result = {"estimates": rows}
    if args.measure:
        if not torch.cuda.is_available():
            print("\n--measure needs CUDA: not measured")
        else:
            print(f"\nMeasured on {torch.cuda.get_device_name()}:\n")
            measured, result["measured"] = measure_table()
            print(measured)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
