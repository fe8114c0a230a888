"""Serving's Triton kernels (rlora.kernels.multi_adapter: shrink and expand over the adapter slot
tables) against the PyTorch path of `MultiAdapterLinear`, in float32 on the CPU through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU): decode steps and
prefill chunks, mixed adapters of other shapes, rows without an adapter, and whole generations."""

import pytest
import torch
from adapters_support import perturbed_adapters
from transformers import AutoModelForCausalLM

from rlora import AdapterConfig, kernels
from rlora.serve import InferenceEngine
from rlora.serve.multi_linear import ForwardContext, wrap_linears
from rlora.serve.slots import AdapterSlots

pytest.importorskip("triton")

ADAPTERS = {
    "small": AdapterConfig(method="hydralora", heads=2, rank=2, target_modules=["q_proj", "down_proj"], seed=11),
    "rl": AdapterConfig(method="rlora", heads=3, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=12),
    "lo": AdapterConfig(method="lora", rank=8, target_modules=["q_proj", "o_proj", "up_proj"], seed=13),
    "zero": AdapterConfig(method="rlora", heads=3, rank=4, router_init="zero", target_modules="all-linear", seed=15),
}
GREEDY = {"max_new_tokens": 8, "ignore_eos_token": True}


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory, tiny_model_path):
    return perturbed_adapters(tiny_model_path, ADAPTERS, tmp_path_factory.mktemp("kernel-adapters"))


@pytest.fixture(scope="module")
def slotted(tiny_model_path, adapter_paths):
    """The tiny model's linears wrapped, every test adapter in a slot (slot order as ADAPTERS)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    context = ForwardContext()
    layers = wrap_linears(model, context)
    engine = InferenceEngine(cache_dir=tiny_model_path.parent, device="cpu")
    slots = AdapterSlots(layers, capacity=len(ADAPTERS) + 1, device=torch.device("cpu"), dtype=torch.float32)
    for adapter_id, path in adapter_paths.items():
        assert slots.acquire(engine.adapter(adapter_id, path)) == list(ADAPTERS).index(adapter_id)
    engine.close()
    return context, layers


@pytest.mark.parametrize("row_tokens", [1, 3, 20], ids=["decode", "short-chunk", "prefill-dot"])
@pytest.mark.parametrize("with_base_rows", [False, True])
def test_every_layer_equals_the_pytorch_path(slotted, row_tokens, with_base_rows):
    context, layers = slotted
    row_slots = torch.tensor([0, 1, 2, 3, 1, 0, 3])
    context.row_slots, context.slots_used = row_slots, len(ADAPTERS)
    context.row_on = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]) if with_base_rows else None
    context.routing = None
    generator = torch.Generator().manual_seed(row_tokens)
    checked = 0
    for layer in layers.values():
        if layer.table is None:
            continue
        x = torch.randn(len(row_slots), row_tokens, layer.in_features, generator=generator)
        with torch.no_grad():
            want = layer(x)
            with kernels.backend("triton"):
                got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        checked += 1
    assert checked == 14  # the 7 linears of both decoder layers: "zero" adapts them all


def test_one_slot_alone(slotted):
    """Every adapted row on slot 0 (the PyTorch path's plain-matmul case)."""
    context, layers = slotted
    context.row_slots, context.slots_used, context.row_on, context.routing = torch.zeros(4, dtype=torch.long), 1, None, None
    layer = layers["model.layers.0.mlp.gate_proj"]
    x = torch.randn(4, 1, layer.in_features)
    with torch.no_grad():
        want = layer(x)
        with kernels.backend("triton"):
            got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_mixed_generation_on_the_kernels_makes_the_same_tokens(tiny_model_path, adapter_paths):
    requests = [("rl", "the slot tables"), ("small", "a"), (None, "base model row, longer"), ("lo", "plain lora"),
                ("zero", "zero router")]

    def generate():
        with InferenceEngine(cache_dir=tiny_model_path.parent, device="cpu") as engine:
            for adapter_id, path in adapter_paths.items():
                engine.adapter(adapter_id, path)
            handles = [engine.submit(text, GREEDY, **({"adapter_id": a} if a else {"base_model": "tiny"})) for a, text in requests]
            return [[t.id for t in h.result(timeout=300).tokens] for h in handles]

    want = generate()
    with kernels.backend("triton"):
        got = generate()
    assert got == want
    assert len({tuple(t) for t in want}) == len(want)
