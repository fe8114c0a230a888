"""The Triton kernels of the fused adapter (rlora.kernels.heads) against its PyTorch path, in
float32 on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 where
there is no GPU): the output, every gradient, and the dropout masks drawn again from the seed."""

import pytest
import torch
from torch import nn

from rlora import AdapterConfig, kernels
from rlora.adapter.fused import FusedAdapter
from rlora.adapter.layer import RLoRALinear

pytest.importorskip("triton")
from rlora.kernels.heads import head_keep_mask  # noqa: E402

CASES = {
    "lora": dict(method="lora"),
    "hydralora": dict(method="hydralora"),
    "rlora": dict(method="rlora"),
    "rlora-no-md": dict(method="rlora", multi_head_dropout=False),
    "rlora-no-mi": dict(method="rlora", random_init=False),
    "rlora-zero-router": dict(method="rlora", router_init="zero"),
    "rlora-5-heads-rank-3": dict(method="rlora", heads=5, rank=3),
}


def make_layer(case, d_in=40, d_out=36, dropout=0.3):
    torch.manual_seed(1234)
    settings = {"heads": None if case == "lora" else 3, "rank": 4, **CASES[case]}
    layer = RLoRALinear(nn.Linear(d_in, d_out), AdapterConfig(dropout=dropout, **settings), torch.Generator().manual_seed(0))
    with torch.no_grad():  # trained-looking weights, so every term matters
        layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.1)
        if layer.router is not None:
            layer.router.add_(torch.randn_like(layer.router))
    return layer


def run(layer, x, use_kernels, head_keep=None, seed=None):
    """The fused function with the layer's tensors; ``x`` already through the base layer."""
    p = layer.dropout if layer.training else 0.0
    return FusedAdapter.apply(
        x, None, layer.base_layer(x), layer.lora_A, layer.lora_B, layer.router, layer.lora_A0, layer.router0,
        layer.lora_B0, head_keep, 1.0 - p, layer.scaling, torch.float32, seed, use_kernels,
    )


def gradients(layer, out, x):
    params = [layer.lora_A, layer.lora_B] + ([layer.router] if layer.router is not None else [])
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    return torch.autograd.grad((out * cotangent).sum(), params + [x])


def assert_close(got, want, tolerance=1e-5):
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_kernels_equal_the_pytorch_path_forward_and_every_gradient(case, training):
    layer = make_layer(case).train(training)
    x = torch.randn(3, 11, 40, requires_grad=True)
    multi_head = training and layer.multi_head_dropout
    if training and not layer.multi_head_dropout:
        pytest.skip("input dropout stays on the PyTorch path (its mask is autograd's own dropout)")
    seed = torch.tensor([987654321]) if multi_head else None
    keep = head_keep_mask(seed, 33, layer.heads, layer.rank, 1.0 - layer.dropout).view(3, 11, layer.heads, layer.rank) if multi_head else None
    with kernels.backend("triton"):
        out, weights = run(layer, x, True, seed=seed)
    want, want_weights = run(layer, x, False, head_keep=keep)
    assert_close(out, want)
    if layer.router is not None:
        assert_close(weights, want_weights)
    for got, expected in zip(gradients(layer, out, x), gradients(layer, want, x)):
        assert_close(got, expected)


def test_masks_are_a_function_of_the_seed_with_the_keep_probability():
    seed = torch.tensor([42])
    keep = head_keep_mask(seed, 512, 3, 4, 0.8)
    assert torch.equal(keep, head_keep_mask(seed, 512, 3, 4, 0.8))
    assert not torch.equal(keep, head_keep_mask(torch.tensor([43]), 512, 3, 4, 0.8))
    assert abs(keep.float().mean().item() - 0.8) < 0.03
    heads = keep.view(-1, 3, 4).transpose(0, 1).reshape(3, -1).float()
    assert not torch.equal(heads[0], heads[1])  # every head its own mask


def test_the_layer_uses_the_kernels_and_draws_one_seed_a_forward():
    layer = make_layer("rlora").train()
    x = torch.randn(2, 5, 40, requires_grad=True)
    torch.manual_seed(3)
    with kernels.backend("triton"):
        out = layer(x)
    after = torch.rand(2)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, (1,))
    assert torch.equal(torch.rand(2), after)  # one draw from the RNG: a resumed run replays it
    keep = head_keep_mask(seed, 10, 3, 4, 0.7).view(2, 5, 3, 4)
    want, _ = run(layer, x, False, head_keep=keep)
    assert_close(out, want)
    for got, expected in zip(gradients(layer, out, x), gradients(layer, want, x)):
        assert_close(got, expected)


def test_an_adapted_model_trains_the_same_on_the_kernels(tiny_model_path):
    """A few optimiser steps of a whole model: the kernels' run follows the PyTorch one (eval-mode
    dropout off, so both see the same computation)."""
    from transformers import AutoModelForCausalLM

    import rlora

    losses = {}
    for name in ("torch", "triton"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        rlora.attach(model, AdapterConfig(method="rlora", heads=3, rank=4, dropout=0.0, target_modules=["gate_proj", "up_proj"]))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
        curve = []
        with kernels.backend(name):
            for _ in range(3):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                curve.append(loss.item())
        losses[name] = curve
    assert losses["torch"][-1] < losses["torch"][0]
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-6)


def test_the_torch_backend_switches_them_off_and_auto_keeps_the_cpu_on_pytorch():
    x = torch.randn(2, 4)
    assert not kernels.enabled(x)  # auto: CUDA only
    with kernels.backend("triton"):
        assert kernels.enabled(x)
        with kernels.backend("torch"):
            assert not kernels.enabled(x)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with kernels.backend("cuda"):
            pass
