"""attach / save / load / diagnostics on the tiny Llama model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import rlora
from rlora import AdapterConfig, AdapterConfigError, AdapterMismatchError
from rlora.adapter.config import VARIANTS
from rlora.adapter.folder import adapter_state_dict, read_adapter_config

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def token_batch(seed=0, batch=2, length=12):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_zero_logits_equal_base_and_training_leaves_base_untouched(variant, tiny_model_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    config = AdapterConfig(rank=4, target_modules=TARGETS, **VARIANTS[variant])
    rlora.attach(model, config)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)

    # Trainable parameters are exactly the adapter's, by the formula.
    mlp = base.model.layers[0].mlp
    expected = 0
    for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        d_out, d_in = linear.weight.shape
        n, r = config.heads, config.rank
        expected += r * d_in + n * d_out * r + (n * d_in if config.has_router else 0)
    expected *= len(base.model.layers)
    assert rlora.trainable_parameters(model) == expected
    assert all(("lora_" in n or "router" in n) for n, p in model.named_parameters() if p.requires_grad)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = model(token_batch(step), labels=token_batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for key, value in base_before.items():
        adapted_key = key.replace(".weight", ".base_layer.weight") if key.replace(".weight", ".base_layer.weight") in after else key
        assert torch.equal(after[adapted_key], value), key
    # ...while the adapter did move, and the frozen correction did not.
    layer = model.model.layers[0].mlp.up_proj
    assert not torch.equal(layer.lora_A, layer.lora_A0) if layer.has_correction else True
    with torch.no_grad():
        assert not torch.allclose(model.eval()(ids).logits, base(ids).logits, atol=1e-4)


def test_lora_matches_peft(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    ours = rlora.attach(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        AdapterConfig(method="lora", rank=8, alpha=16, dropout=0.0, target_modules=TARGETS),
    )
    theirs = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False),
    )
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for name, layer in rlora.adapter_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
            layer.lora_A.copy_(a)
            layer.lora_B[0].copy_(b)
        pairs.append((layer, a, b))
    ids = token_batch()
    ours.train(), theirs.train()
    out_ours, out_theirs = ours(ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for layer, a, b in pairs:
        torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad[0], b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["lora", "rlora"])
def test_save_load_round_trip_is_bit_identical(variant, tiny_model_path, tmp_path):
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(**VARIANTS[variant]))
    with torch.no_grad():  # as if trained
        for layer in rlora.adapter_layers(model).values():
            layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.01)
            if layer.router is not None:
                layer.router.normal_()
    rlora.save(model, tmp_path / "adapter", base_model_name="tiny")

    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == variant and meta["base_model_name"] == "tiny"
    assert meta["base_model_fingerprint"] and meta["rlora_version"] == rlora.__version__
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    path = "model.layers.0.mlp.down_proj"
    n = 1 if variant == "lora" else 3
    assert tensors[f"{path}.lora_A"].shape == (4, 256)
    assert tensors[f"{path}.lora_B"].shape == (n, 128, 4)
    assert (f"{path}.router" in tensors) == (variant != "lora")
    assert (f"{path}.lora_A0" in tensors) == (f"{path}.lora_B0" in tensors) == (variant == "rlora")
    assert (f"{path}.router0" in tensors) == (variant == "rlora")  # format version 2: the routed correction
    if variant == "rlora":
        assert tensors[f"{path}.lora_B0"].shape == (n, 128, 4) and tensors[f"{path}.router0"].shape == (n, 256)
    assert meta["format_version"] == 2 and meta["router_init"] == "kaiming"

    loaded = rlora.load(AutoModelForCausalLM.from_pretrained(tiny_model_path), tmp_path / "adapter")
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(loaded)[key], value)


def test_format_version_1_folder_still_loads(tiny_model_path, tmp_path):
    """A folder written the old way (zero router, mean-head correction, no router_init, format
    version 1) loads as router_init="zero": the same function, and the same exact start."""
    from adapters_support import rewrite_as_format_v1

    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(router_init="zero", seed=3))
    ids = token_batch()
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()(ids).logits
        torch.testing.assert_close(model.eval()(ids).logits, base_logits, rtol=0, atol=1e-5)
        for layer in rlora.adapter_layers(model).values():
            layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
            layer.router.normal_()
    old = rewrite_as_format_v1(rlora.save(model, tmp_path / "v1", base_model_name="tiny"))
    config, meta = read_adapter_config(old)
    assert meta["format_version"] == 1 and config.router_init == "zero"
    loaded = rlora.load(AutoModelForCausalLM.from_pretrained(tiny_model_path), old)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)
    # A version 1 HydraLoRA (Kaiming router, no correction) loads with the Kaiming router.
    hydra = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(method="hydralora"))
    folder = rlora.save(hydra, tmp_path / "hydra-v1", base_model_name="tiny")
    meta = json.loads((folder / "adapter_config.json").read_text())
    del meta["router_init"]
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert read_adapter_config(folder)[0].router_init == "kaiming"


def test_a_newer_format_version_is_refused(tiny_model_path, tmp_path):
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig())
    folder = rlora.save(model, tmp_path / "future", base_model_name="tiny")
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(rlora.AdapterMismatchError, match="format version 3"):
        rlora.load(AutoModelForCausalLM.from_pretrained(tiny_model_path), folder)


def test_load_refuses_another_base_model(tiny_model_path, tmp_path):
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig())
    rlora.save(model, tmp_path / "adapter", base_model_name="tiny")
    config = AutoModelForCausalLM.from_pretrained(tiny_model_path).config.to_dict()
    config.update(intermediate_size=192)
    other = LlamaForCausalLM(LlamaConfig(**config))
    other.config.name_or_path = "other-model"
    with pytest.raises(AdapterMismatchError, match=r"made for base model 'tiny'.*not for 'other-model'"):
        rlora.load(other, tmp_path / "adapter")


def test_save_replaces_an_existing_adapter_atomically(tiny_model_path, tmp_path):
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig())
    rlora.save(model, tmp_path / "adapter")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.lora_B.add_(1.0)
    rlora.save(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or retired folder left
    loaded = rlora.load(AutoModelForCausalLM.from_pretrained(tiny_model_path), tmp_path / "adapter")
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.lora_B, model.model.layers[0].mlp.up_proj.lora_B)


def test_head_similarity_rlora_heads_differ_hydralora_heads_identical(tiny_model_path):
    rl = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(method="rlora", heads=4))
    similarity = rlora.head_similarity(rl)
    assert len(similarity["per_layer"]) == 6
    assert abs(similarity["mean"]) < 0.1  # independent random heads are nearly orthogonal
    layer = rl.model.layers[1].mlp.gate_proj
    assert not torch.allclose(layer.lora_B[0], layer.lora_B[1])

    hydra = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(method="hydralora", heads=4))
    layer = hydra.model.layers[1].mlp.gate_proj
    assert all(torch.equal(layer.lora_B[0], layer.lora_B[i]) for i in range(4))
    assert rlora.head_similarity(hydra)["mean"] == 1.0
    lora = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(method="lora"))
    assert rlora.head_similarity(lora) == {"per_layer": {}, "mean": None}


def test_head_similarity_of_known_heads(tiny_model_path):
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(heads=2, target_modules=["up_proj"]))
    with torch.no_grad():
        for layer in rlora.adapter_layers(model).values():
            layer.lora_B[1].copy_(-layer.lora_B[0])
    assert rlora.head_similarity(model)["mean"] == pytest.approx(-1.0)


def test_routing_summary_reports_weights_and_entropy(tiny_model_path):
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(heads=4, router_init="zero"))
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    summary = rlora.routing_summary(model, [{"input_ids": ids, "attention_mask": mask}])
    assert len(summary["per_layer"]) == 6
    for stats in summary["per_layer"].values():
        # A zero router weighs every head 1/N: maximal entropy.
        assert stats["mean_weight"] == pytest.approx([0.25] * 4)
        assert stats["entropy"] == pytest.approx(stats["max_entropy"], rel=1e-5)
        assert stats["tokens"] == 12 + 6  # padding left out
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.router.normal_(std=50.0)
    summary = rlora.routing_summary(model, [{"input_ids": ids}])
    skewed = summary["per_layer"]["model.layers.0.mlp.up_proj"]
    assert sum(skewed["mean_weight"]) == pytest.approx(1.0, abs=1e-5)
    assert skewed["entropy"] < 0.5 * skewed["max_entropy"]
    assert summary["per_layer"]["model.layers.1.mlp.up_proj"]["mean_weight"] == pytest.approx([0.25] * 4)
    assert all(layer.routing_observer is None for layer in rlora.adapter_layers(model).values())


def test_attach_is_seeded_and_leaves_global_rng_alone(tiny_model_path):
    state = torch.random.get_rng_state()
    first = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)
    second = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(seed=3))
    third = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(seed=4))
    for key, value in adapter_state_dict(first).items():
        assert torch.equal(adapter_state_dict(second)[key], value)
    assert not torch.equal(adapter_state_dict(third)["model.layers.0.mlp.up_proj.lora_B"],
                           adapter_state_dict(first)["model.layers.0.mlp.up_proj.lora_B"])


def test_target_modules_unknown_names_list_the_linear_layers(tiny_model):
    with pytest.raises(ValueError, match=r"\['q_pro'\].*down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        rlora.attach(tiny_model, AdapterConfig(target_modules=["q_pro", "up_proj"]))


def test_all_linear_targets_every_linear_but_the_head(tiny_model):
    rlora.attach(tiny_model, AdapterConfig(target_modules="all-linear"))
    names = set(rlora.adapter_layers(tiny_model))
    assert len(names) == 2 * 7 and "lm_head" not in names


def test_attach_twice_is_refused(tiny_model):
    rlora.attach(tiny_model, AdapterConfig())
    with pytest.raises(ValueError, match="already has adapters"):
        rlora.attach(tiny_model, AdapterConfig())


@pytest.mark.parametrize(
    "settings, field",
    [
        (dict(heads=0), "heads"),
        (dict(heads=65), "heads"),
        (dict(rank=0), "rank"),
        (dict(rank=257), "rank"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(method="lora", heads=2), "heads"),
        (dict(method="moe"), "method"),
        (dict(alpha=0), "alpha"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules="everything"), "target_modules"),
        (dict(method="hydralora", random_init=True), "random_init"),
        (dict(init_scale="huge"), "init_scale"),
        (dict(heads=True), "heads"),
    ],
)
def test_config_validation_names_the_field(settings, field):
    with pytest.raises(AdapterConfigError) as err:
        AdapterConfig(**settings)
    assert err.value.field == field and field in str(err.value)


def test_config_defaults_follow_the_paper():
    config = AdapterConfig()
    assert (config.method, config.alpha, config.dropout, config.gamma) == ("rlora", 32.0, 0.2, 64.0)
    assert config.target_modules == ("gate_proj", "up_proj", "down_proj")
    assert AdapterConfig(method="lora").heads == 1
    assert AdapterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(AdapterConfigError, match="unknown adapter setting"):
        AdapterConfig.from_dict({"ranks": 4})


@pytest.mark.parametrize("variant", ["hydralora", "rlora-no-mi"])
def test_zero_heads_break_symmetry_through_the_router(variant, tiny_model_path):
    """Zero heads with a zero router would get identical gradients forever; the router starts
    random (as HydraLoRA's reference) so that training separates them."""
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(**VARIANTS[variant], dropout=0.0))
    layer = model.model.layers[0].mlp.up_proj
    assert torch.count_nonzero(layer.router) == layer.router.numel()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        model(token_batch(step), labels=token_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(layer.lora_B[0], layer.lora_B[1])
    assert rlora.head_similarity(model)["mean"] < 0.999


def test_fingerprint_tells_checkpoints_apart_but_not_runtime_flags(tiny_model_path, tmp_path):
    from rlora.adapter.folder import base_model_fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    fingerprint = base_model_fingerprint(model)
    model.config.output_hidden_states = True
    model.config.name_or_path = "elsewhere"
    assert base_model_fingerprint(model) == fingerprint
    # A bfloat16 load of the same checkpoint is the same base model.
    assert base_model_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16)) == fingerprint

    rlora.save(rlora.attach(model, AdapterConfig()), tmp_path / "adapter")
    fine_tuned = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        fine_tuned.model.embed_tokens.weight.add_(0.1)  # same architecture, other weights
    with pytest.raises(AdapterMismatchError, match="made for base model"):
        rlora.load(fine_tuned, tmp_path / "adapter")
