"""The Triton kernels compiled for a real GPU, in bfloat16 (``pytest -m gpu``, skipped without
CUDA): the fused adapter's forward and every gradient against its PyTorch path, the serving
kernels against `MultiAdapterLinear`'s PyTorch path, and the trainer with Liger's base kernels
against the trainer without them. The CPU files (test_kernels_*.py) check the same kernels in
float32 through Triton's interpreter."""

import json

import pytest
import torch
from adapters_support import perturbed_adapters
from torch import nn
from transformers import AutoModelForCausalLM

from rlora import AdapterConfig, kernels
from rlora.adapter.fused import FusedAdapter
from rlora.adapter.layer import RLoRALinear

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

# bfloat16 has 8 bits of mantissa: the two paths round their sums in different orders.
BF16_TOLERANCE = 2e-2


def assert_close(got, want, tolerance=BF16_TOLERANCE):
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * want.float().abs().max().item())


@pytest.mark.parametrize("method", ["lora", "hydralora", "rlora"])
@pytest.mark.parametrize("training", [True, False])
def test_heads_kernels_equal_the_pytorch_path_in_bfloat16(method, training):
    from rlora.kernels.heads import head_keep_mask

    torch.manual_seed(1234)
    config = AdapterConfig(method=method, heads=None if method == "lora" else 4, rank=8, dropout=0.1)
    base = nn.Linear(896, 896, dtype=torch.bfloat16)
    layer = RLoRALinear(base, config, torch.Generator().manual_seed(0)).cuda().train(training)
    with torch.no_grad():
        layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.05)
    x = torch.randn(4, 64, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    multi_head = training and layer.multi_head_dropout
    if training and not multi_head:
        pytest.skip("input dropout stays on the PyTorch path")
    seed = torch.tensor([424242], device="cuda") if multi_head else None
    p = layer.dropout if training else 0.0
    keep = head_keep_mask(seed, 4 * 64, layer.heads, layer.rank, 1.0 - p).view(4, 64, layer.heads, layer.rank) if multi_head else None

    def run(use_kernels):
        return FusedAdapter.apply(
            x, None, layer.base_layer(x), layer.lora_A, layer.lora_B, layer.router, layer.lora_A0, layer.router0,
            layer.lora_B0, None if use_kernels else keep, 1.0 - p, layer.scaling, torch.bfloat16,
            seed if use_kernels else None, use_kernels,
        )[0]

    params = [q for q in (layer.lora_A, layer.lora_B, layer.router) if q is not None] + [x]
    cotangent = torch.randn(4, 64, 896, device="cuda", dtype=torch.bfloat16)
    got = run(True)
    want = run(False)
    assert_close(got, want)
    for g, w in zip(torch.autograd.grad((got * cotangent).sum(), params), torch.autograd.grad((want * cotangent).sum(), params)):
        assert_close(g, w)


ADAPTERS = {
    "rl": AdapterConfig(method="rlora", heads=3, rank=4, target_modules="all-linear", seed=12),
    "lo": AdapterConfig(method="lora", rank=8, target_modules=["q_proj", "o_proj", "up_proj"], seed=13),
}


@pytest.mark.parametrize("row_tokens", [1, 20], ids=["decode", "prefill"])
def test_serving_kernels_equal_the_pytorch_path_in_bfloat16(tiny_model_path, tmp_path, row_tokens):
    from rlora.serve import InferenceEngine
    from rlora.serve.multi_linear import ForwardContext, wrap_linears
    from rlora.serve.slots import AdapterSlots

    paths = perturbed_adapters(tiny_model_path, ADAPTERS, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).cuda().eval()
    context = ForwardContext()
    layers = wrap_linears(model, context)
    engine = InferenceEngine(cache_dir=tiny_model_path.parent, device="cpu")
    slots = AdapterSlots(layers, capacity=3, device=torch.device("cuda"), dtype=torch.bfloat16)
    for adapter_id, path in paths.items():
        slots.acquire(engine.adapter(adapter_id, path))
    engine.close()
    context.row_slots = torch.tensor([0, 1, 0, 1, 1], device="cuda")
    context.slots_used, context.routing = 2, None
    context.row_on = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], device="cuda")
    checked = 0
    for layer in layers.values():
        if layer.table is None:
            continue
        x = torch.randn(5, row_tokens, layer.in_features, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            with kernels.backend("torch"):
                want = layer(x)
            got = layer(x)  # auto: the kernels, on CUDA
        assert_close(got, want)
        checked += 1
    assert checked == 14


def test_trainer_with_liger_base_kernels_follows_the_trainer_without(tmp_path, tiny_model_path):
    pytest.importorskip("liger_kernel")
    from rlora.training import TrainConfig, train

    data = tmp_path / "ok.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say ok {i}", "completion": "ok"}) + "\n" for i in range(40)))
    losses = {}
    for setting in ("liger", "none"):
        config = TrainConfig(
            base_model="tiny",
            mixture=[{"path": str(data), "task": "ok"}],
            training={"max_steps": 10, "batch_size": 8, "learning_rate": 3e-2, "max_seq_len": 32, "device": "cuda",
                      "base_kernels": setting},
            output_dir=str(tmp_path / setting),
        )
        metrics = train(config, cache_dir=tiny_model_path.parent)
        assert metrics["base_kernels"] == setting
        losses[setting] = [row["loss"] for row in metrics["train_loss"]]
    # Same seed, same batches: the first step's loss is the same model's up to bf16 rounding.
    assert losses["liger"][0] == pytest.approx(losses["none"][0], rel=3e-2)
    assert losses["liger"][-1] < losses["liger"][0]
