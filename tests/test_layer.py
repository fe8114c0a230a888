"""The adapter layer against a plain per-head loop, its masks, and its exact start."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlora import AdapterConfig
from rlora.adapter.config import VARIANTS
from rlora.adapter.fused import FusedAdapter
from rlora.adapter.layer import RLoRALinear

# The paper's variants, and R-LoRA with the zero router of adapter format version 1.
CASES = {**VARIANTS, "rlora-zero-router": dict(method="rlora", router_init="zero")}


def make_layer(variant, d_in=24, d_out=20, rank=4, dropout=0.3, seed=0, **extra):
    torch.manual_seed(1234)
    base = nn.Linear(d_in, d_out)
    config = AdapterConfig(rank=rank, dropout=dropout, seed=seed, **{**CASES[variant], **extra})
    layer = RLoRALinear(base, config, torch.Generator().manual_seed(seed))
    with torch.no_grad():  # trained-looking weights, so every term matters
        layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.1)
        if layer.router is not None:
            layer.router.add_(torch.randn_like(layer.router))
    return layer


def per_head_loop(layer, x, head_masks=None, input_mask=None):
    """The reference computation: one B_i matmul per head, as the paper writes it."""
    y = layer.base_layer(x)
    A, B, s = layer.lora_A, layer.lora_B, layer.scaling
    x_a = x * input_mask if input_mask is not None else x
    h = x_a @ A.T
    w = torch.softmax(x @ layer.router.T, -1) if layer.router is not None else torch.ones(*x.shape[:-1], 1)
    for i in range(layer.heads):
        h_i = h * head_masks[..., i, :] if head_masks is not None else h
        y = y + s * w[..., i : i + 1] * (h_i @ B[i].T)
    if layer.has_correction:
        h0 = x @ layer.lora_A0.T
        if layer.router0 is None:  # zero router: every initial head weighs 1/N, the mean head
            y = y - s * h0 @ layer.lora_B0.T
        else:
            w0 = torch.softmax(x @ layer.router0.T, -1)
            for i in range(layer.heads):
                y = y - s * w0[..., i : i + 1] * (h0 @ layer.lora_B0[i].T)
    return y


def masks_of(layer, x, seed):
    """The masks the layer's forward pass draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    if layer.multi_head_dropout:
        keep = 1.0 - layer.dropout
        return torch.empty(*x.shape[:-1], layer.heads, layer.rank).bernoulli_(keep).div_(keep), None
    return None, F.dropout(torch.ones_like(x), layer.dropout, training=True)


def grads(layer, out, x):
    """Gradients of a fixed random projection of the output."""
    params = [layer.lora_A, layer.lora_B] + ([layer.router] if layer.router is not None else [])
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    return torch.autograd.grad((out.float() * cotangent).sum(), params + [x])


def assert_close_in_norm(got, want, tolerance):
    error = (got.float() - want).norm() / want.norm().clamp_min(1e-12)
    assert error < tolerance, f"relative error {error:.3g}"


@pytest.mark.parametrize("variant", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_per_head_loop_float32(variant, training):
    layer = make_layer(variant).train(training)
    x = torch.randn(3, 7, 24, requires_grad=True)
    torch.manual_seed(7)
    fused = layer(x)
    head_masks, input_mask = masks_of(layer, x, 7) if training else (None, None)
    oracle = per_head_loop(layer, x, head_masks, input_mask)
    torch.testing.assert_close(fused, oracle, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(layer, fused, x), grads(layer, oracle, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", CASES)
def test_fused_equals_per_head_loop_bfloat16(variant):
    layer = make_layer(variant).train()
    x32 = torch.randn(4, 9, 24)
    layer_bf16 = make_layer(variant).train().to(torch.bfloat16)
    x = x32.to(torch.bfloat16).requires_grad_()
    torch.manual_seed(3)
    fused = layer_bf16(x)
    head_masks, input_mask = masks_of(layer_bf16, x, 3)
    # The oracle runs in float32 on the same (bf16-rounded) weights and masks.
    layer.load_state_dict({k: v.float() for k, v in layer_bf16.state_dict().items()})
    x_ref = x.detach().float().requires_grad_()
    oracle = per_head_loop(
        layer, x_ref,
        head_masks.float() if head_masks is not None else None,
        input_mask.float() if input_mask is not None else None,
    )
    assert fused.dtype == torch.bfloat16
    assert_close_in_norm(fused, oracle, 1e-2)
    for got, want in zip(grads(layer_bf16, fused, x), grads(layer, oracle, x_ref)):
        assert_close_in_norm(got, want, 2e-2)


def test_autocast_bfloat16_runs_and_keeps_router_softmax_in_float32():
    layer = make_layer("rlora").train()
    seen = []
    layer.routing_observer = lambda _, w: seen.append(w)
    x = torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32
    # Weights sum to one up to bf16 rounding of a float32 softmax.
    torch.testing.assert_close(seen[0].float().sum(-1), torch.ones(2, 5), atol=1e-2, rtol=0)


def one_hot_heads_layer(variant, dropout):
    """d_out = N*r and B_i copies h into block i: the output shows each head's input."""
    n, r = 3, 8
    extra = {"random_init": False} if variant == "rlora" else {}
    layer = make_layer(variant, d_in=16, d_out=n * r, rank=r, dropout=dropout, **extra)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        layer.router.zero_()
        layer.lora_B.zero_()
        for i in range(n):
            layer.lora_B[i, i * r : (i + 1) * r, :] = torch.eye(r)
    return layer


def observed_head_masks(layer, x):
    n, r = layer.heads, layer.rank
    h = x @ layer.lora_A.T
    out = layer(x).reshape(*x.shape[:-1], n, r)
    return out / (layer.scaling / n) / h.unsqueeze(-2)


def test_heads_get_independent_dropout_masks():
    layer = one_hot_heads_layer("rlora", dropout=0.5).train()
    x = torch.randn(64, 32, 16)
    masks = observed_head_masks(layer, x)
    values = masks.round(decimals=3).unique().tolist()
    assert values == [0.0, 2.0]
    keep = (masks > 0).float()
    assert abs(keep.mean().item() - 0.5) < 0.02
    # Independent heads agree on about half the entries, identical ones on all.
    for i in range(3):
        for j in range(i + 1, 3):
            agreement = (keep[..., i, :] == keep[..., j, :]).float().mean().item()
            assert 0.45 < agreement < 0.55
    # Different tokens get different masks too.
    assert not torch.equal(keep[0, 0], keep[0, 1])


def test_eval_mode_has_no_dropout():
    layer = one_hot_heads_layer("rlora", dropout=0.5).eval()
    masks = observed_head_masks(layer, torch.randn(4, 8, 16))
    torch.testing.assert_close(masks, torch.ones_like(masks))


def test_input_dropout_is_shared_by_all_heads():
    layer = one_hot_heads_layer("hydralora", dropout=0.5).train()
    x = torch.randn(8, 8, 16)
    torch.manual_seed(0)
    out = layer(x).reshape(8, 8, 3, 8)
    torch.testing.assert_close(out[..., 0, :], out[..., 1, :])
    torch.testing.assert_close(out[..., 0, :], out[..., 2, :])
    assert not torch.allclose(out, layer.eval()(x).reshape(8, 8, 3, 8))


@pytest.mark.parametrize("variant", CASES)
def test_layer_starts_exactly_at_the_base_layer(variant):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = RLoRALinear(base, AdapterConfig(**CASES[variant]), torch.Generator().manual_seed(5)).eval()
    x = torch.randn(10, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    if layer.router is not None:  # every router starts Kaiming-uniform but the zero setting's
        assert (torch.count_nonzero(layer.router) == 0) == (variant == "rlora-zero-router")


def test_rlora_initialisation_follows_table_1():
    d_in, d_out, r, n = 512, 1024, 16, 4
    layer = RLoRALinear(nn.Linear(d_in, d_out), AdapterConfig(heads=n, rank=r), torch.Generator().manual_seed(0))
    c = d_out**0.25 / math.sqrt(64)
    assert layer.lora_A.std().item() == pytest.approx(c / math.sqrt(d_in), rel=0.05)
    assert layer.lora_B.std().item() == pytest.approx(c / math.sqrt(d_out), rel=0.05)
    # The router Kaiming-uniform (as nn.Linear: bound 1/sqrt(d_in)), the correction frozen
    # copies of the initial A, router and every head.
    bound = 1 / math.sqrt(d_in)
    assert 0.9 * bound < layer.router.abs().max().item() <= bound
    torch.testing.assert_close(layer.lora_A0, layer.lora_A.detach())
    torch.testing.assert_close(layer.router0, layer.router.detach())
    torch.testing.assert_close(layer.lora_B0, layer.lora_B.detach())
    assert not any(t.requires_grad for t in (layer.lora_A0, layer.router0, layer.lora_B0))
    assert {name for name, _ in layer.named_buffers()} == {"lora_A0", "router0", "lora_B0"}


def test_zero_router_setting_keeps_the_mean_head_correction():
    layer = RLoRALinear(nn.Linear(64, 32), AdapterConfig(router_init="zero"), torch.Generator().manual_seed(0))
    assert torch.count_nonzero(layer.router) == 0
    assert layer.router0 is None
    torch.testing.assert_close(layer.lora_B0, layer.lora_B.detach().mean(0))


def test_zero_router_is_refused_for_zero_heads():
    for variant in ("hydralora", "rlora-no-mi", "lora"):
        with pytest.raises(ValueError, match="router_init"):
            AdapterConfig(**VARIANTS[variant], router_init="zero")
    with pytest.raises(ValueError, match="router_init"):
        AdapterConfig(router_init="normal")


def test_exact_start_in_a_trained_looking_regime():
    """A larger layer, large inputs, a sharp initial router (far from uniform weights): the
    correction still cancels the initial update to float32 rounding."""
    torch.manual_seed(0)
    base = nn.Linear(256, 512)
    layer = RLoRALinear(base, AdapterConfig(heads=4, rank=8, gamma=1.0), torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():
        layer.router.mul_(20)
        layer.router0.copy_(layer.router)
    x = torch.randn(4, 9, 256) * 3
    weights = torch.softmax(x @ layer.router.T, -1)
    assert weights.max() > 0.9  # routing far from 1/N: the mean head would not cancel it
    h = x @ layer.lora_A.T
    initial_update = layer.scaling * torch.einsum("...n,ndr,...r->...d", weights, layer.lora_B.detach(), h)
    # Cancelled to float32 rounding of the update's size (no less: it is computed, then subtracted).
    atol = 1e-5 * initial_update.abs().max().item()
    assert initial_update.abs().max() > 1000 * atol
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=atol)


def test_reference_init_scale_uses_rank():
    d_in, d_out, r = 512, 1024, 16
    layer = RLoRALinear(
        nn.Linear(d_in, d_out), AdapterConfig(rank=r, init_scale="reference"), torch.Generator().manual_seed(0)
    )
    c = r**0.25 / math.sqrt(64)
    assert layer.lora_B.std().item() == pytest.approx(c / math.sqrt(d_out), rel=0.05)


def test_zero_head_methods_have_no_correction_and_kaiming_a():
    for variant in ("lora", "hydralora", "rlora-no-mi"):
        layer = RLoRALinear(nn.Linear(256, 32), AdapterConfig(**VARIANTS[variant]), torch.Generator().manual_seed(0))
        assert not layer.has_correction
        assert torch.count_nonzero(layer.lora_B) == 0
        bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) as PEFT
        assert layer.lora_A.abs().max().item() <= bound
        assert layer.lora_A.abs().max().item() > 0.9 * bound


def test_rank_stabilized_scaling():
    assert AdapterConfig(rank=16, alpha=32).scaling == 2.0
    assert AdapterConfig(rank=16, alpha=32, rank_stabilized=True).scaling == 8.0


# --- The fused autograd function against the layer as it was before it (autograd through
# plain ops), with the same masks: the RNG draws are the same calls in the same order.


def unfused_forward(layer, x):
    """The layer's forward before `FusedAdapter`, verbatim: autograd saves what it saves."""
    result = layer.base_layer(x)
    r, n = layer.rank, layer.heads
    p = layer.dropout if layer.training else 0.0
    input_dropout = p > 0 and not layer.multi_head_dropout
    reads_x = [layer.lora_A] if not input_dropout else []
    if layer.router is not None:
        reads_x.append(layer.router)
    if layer.has_correction:
        reads_x.append(layer.lora_A0)
        if layer.router0 is not None:
            reads_x.append(layer.router0)
    z = F.linear(x, torch.cat(reads_x)) if reads_x else None
    if input_dropout:
        h = F.linear(F.dropout(x, p, training=True), layer.lora_A)
    else:
        h, z = z[..., :r], z[..., r:]
    heads = h.unsqueeze(-2)
    if p > 0 and layer.multi_head_dropout:
        keep = 1.0 - layer.dropout
        heads = heads * torch.empty(*h.shape[:-1], n, r).bernoulli_(keep).div_(keep)
    if layer.router is not None:
        heads = heads * torch.softmax(z[..., :n].float(), dim=-1).unsqueeze(-1)
    stacked = heads.expand(*h.shape[:-1], n, r).reshape(*h.shape[:-1], n * r)
    writes = layer.lora_B.permute(1, 0, 2).reshape(layer.out_features, n * r)
    if layer.has_correction:
        # The correction as the layer computed it with a zero router (format version 1): the
        # mean initial head; with a Kaiming router, the initial heads weighed by the initial router.
        h0 = z[..., n:n + r] if layer.router is not None else z[..., :r]
        if layer.router0 is None:
            stacked = torch.cat([stacked, h0], dim=-1)
            writes = torch.cat([writes, -layer.lora_B0], dim=1)
        else:
            w0 = torch.softmax(z[..., n + r :].float(), dim=-1)
            stacked = torch.cat([stacked, (w0.unsqueeze(-1) * h0.unsqueeze(-2)).flatten(-2)], dim=-1)
            writes = torch.cat([writes, -layer.lora_B0.permute(1, 0, 2).reshape(layer.out_features, n * r)], dim=1)
    flat = result.reshape(-1, layer.out_features)
    out = torch.addmm(flat, stacked.reshape(-1, stacked.shape[-1]), (writes * layer.scaling).T)
    return out.view(result.shape)


def assert_close_to_magnitude(got, want, tolerance=1e-5):
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())


@pytest.mark.parametrize("variant", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_fused_function_equals_the_unfused_layer_float32(variant, training):
    layer = make_layer(variant, d_in=40, d_out=36, dropout=0.4).train(training)
    x = torch.randn(3, 11, 40, requires_grad=True)
    torch.manual_seed(5)
    fused = layer(x)
    after_fused = torch.rand(4)
    torch.manual_seed(5)
    unfused = unfused_forward(layer, x)
    # The same draws, and no more: a resumed run replays the RNG exactly.
    assert torch.equal(torch.rand(4), after_fused)
    assert_close_to_magnitude(fused, unfused)
    for got, want in zip(grads(layer, fused, x), grads(layer, unfused, x)):
        assert_close_to_magnitude(got, want)


@pytest.mark.parametrize("variant", CASES)
def test_fused_function_gradcheck_float64(variant):
    layer = make_layer(variant, d_in=7, d_out=6, rank=2, dropout=0.5).double()
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    base_out = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    head_keep = torch.rand(2, 3, layer.heads, 2) > 0.5 if layer.multi_head_dropout else None
    # Input dropout happens before the function (torch.native_dropout): it gets the dropped input apart,
    # here an independent tensor so that both of its gradients are checked.
    x_dropped = None if layer.multi_head_dropout else torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)

    def delta(x, base_out, lora_A, lora_B, *rest):
        dropped = rest[0] if x_dropped is not None else None
        router = rest[-1] if layer.router is not None else None
        return FusedAdapter.apply(
            x, dropped, base_out, lora_A, lora_B, router, layer.lora_A0, layer.router0, layer.lora_B0,
            head_keep, 0.5, layer.scaling, torch.float64,
        )[0]

    inputs = [x, base_out, layer.lora_A, layer.lora_B]
    inputs += [x_dropped] if x_dropped is not None else []
    inputs += [layer.router] if layer.router is not None else []
    assert torch.autograd.gradcheck(delta, tuple(inputs))


def test_routing_observer_sees_the_router_softmax():
    layer = make_layer("rlora").train()
    seen = []
    layer.routing_observer = lambda observed_layer, weights: seen.append((observed_layer, weights))
    x = torch.randn(2, 5, 24)
    layer(x).sum().backward()
    (observed_layer, weights), = seen
    assert observed_layer is layer and not weights.requires_grad
    torch.testing.assert_close(weights, torch.softmax(x @ layer.router.detach().T, -1))


def saved_bytes(layer, x):
    """Bytes of the distinct storages autograd saves in one forward, apart from x, the
    parameters and buffers: (per-token activations, per-forward weight copies)."""
    excluded = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}
    activations, weights = {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            per_token = tensor.dim() > 0 and tensor.shape[0] == x.shape[0]  # x is (tokens, d)
            (activations if per_token else weights)[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(activations.values()), sum(weights.values())


def test_saved_activations_grow_with_heads_only_by_router_weights_and_masks():
    """Per token, rlora saves h and h0 (r floats each), the router and initial router weights
    (N floats each) and the multi-head masks (N*r bools): from N=3 to N=8 at rank r that is at
    most tokens * 5 * 2 * 4 bytes of router weights plus tokens * 5 * r bytes of masks more,
    never the (tokens, N*r) intermediate."""
    d, rank, tokens = 64, 4, 128
    x = torch.randn(tokens, d, requires_grad=True)
    saved = {}
    for heads in (3, 8):
        layer = RLoRALinear(nn.Linear(d, d), AdapterConfig(heads=heads, rank=rank), torch.Generator().manual_seed(0))
        saved[heads] = saved_bytes(layer.train(), x)
    (activations3, weight_copies3), (activations8, weight_copies8) = saved[3], saved[8]
    assert activations3 == tokens * (2 * (4 * rank + 4 * 3) + 3 * rank)
    assert activations8 - activations3 <= tokens * (8 - 3) * 2 * 4 + tokens * (8 - 3) * rank
    # The weights cast once per forward and kept for backward: the new heads' rows and columns
    # (router and initial router, heads and initial heads).
    assert weight_copies8 - weight_copies3 <= (8 - 3) * 2 * (d + rank * d) * 4


@pytest.mark.parametrize("heads", [3, 8])
def test_input_dropout_saves_the_dropped_input_once_whatever_the_heads(heads):
    """Dropout's bool mask (d bytes a token) and the dropped input (4d), h (4r) and the
    router weights (4N): never a copy of the input per head, as the reference loop keeps."""
    d, rank, tokens = 64, 4, 128
    x = torch.randn(tokens, d, requires_grad=True)
    config = AdapterConfig(method="hydralora", heads=heads, rank=rank, dropout=0.2)
    layer = RLoRALinear(nn.Linear(d, d), config, torch.Generator().manual_seed(0)).train()
    activations, _ = saved_bytes(layer, x)
    assert activations == tokens * (d + 4 * d + 4 * rank + 4 * heads)
