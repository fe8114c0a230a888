"""Per-job evidence that the heads specialised: the learned-update similarity, the routing-by-task
table and the gradient norms a finished run's metrics carry (the worker stores these metrics as
the job's and the adapter's)."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import rlora
from rlora import AdapterConfig
from rlora.adapter import initial_heads, routing_by_task, update_similarity
from rlora.adapter.diagnostics import mutual_information
from rlora.training import TrainConfig, train


def test_mutual_information_of_known_tables():
    assert mutual_information(torch.tensor([[5, 5], [5, 5]])) == pytest.approx(0.0, abs=1e-12)  # routing ignores the task
    assert mutual_information(torch.tensor([[7, 0, 0], [0, 4, 0], [0, 0, 9]])) == pytest.approx(
        -sum(p * math.log(p) for p in (7 / 20, 4 / 20, 9 / 20))  # each task its own head: H(task)
    )


def test_learned_update_similarity_sees_through_random_initial_heads(tiny_model_path):
    """Random heads moved by the same update: their raw similarity stays low, their learned
    update's is 1. B(0) comes from the routed correction's frozen copy, or a given snapshot."""
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(heads=3, target_modules=["up_proj"]))
    start = initial_heads(model)
    with torch.no_grad():
        for layer in rlora.adapter_layers(model).values():
            # One small update for every head (a tenth of their size).
            layer.lora_B.add_(0.1 * layer.lora_B.std() * torch.randn(layer.lora_B.shape[1:]))
    raw, learned = rlora.head_similarity(model), update_similarity(model)
    assert raw["mean"] < 0.5
    assert learned["mean"] == pytest.approx(1.0, abs=1e-5)
    assert set(learned["per_layer"]) == set(raw["per_layer"]) and set(learned["per_module"]) == {"up_proj"}
    assert update_similarity(model, start) == learned
    # HydraLoRA's heads start at zero: their update is the heads themselves.
    hydra = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(method="hydralora", target_modules=["up_proj"]))
    with torch.no_grad():
        for layer in rlora.adapter_layers(hydra).values():
            layer.lora_B.normal_()
    assert update_similarity(hydra)["per_layer"] == pytest.approx(rlora.head_similarity(hydra)["per_layer"])
    # A zero-router adapter keeps only the mean initial head: without a snapshot B(0) is unknown.
    zero = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(router_init="zero"))
    assert update_similarity(zero) == {"per_layer": {}, "per_module": {}, "mean": None}
    assert update_similarity(zero, initial_heads(zero))["mean"] == pytest.approx(1.0)  # no update yet: zero vectors alike


def test_routing_by_task_separates_tasks_a_router_tells_apart(tiny_model_path):
    """A router that sends token 'a' to head 0 and 'b' to head 1: two tasks made of those tokens
    are routed apart (mutual information ln 2), two tasks of the same tokens are not (0)."""
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path), AdapterConfig(heads=2, target_modules=["q_proj"]))
    embeddings = model.get_input_embeddings().weight.detach()
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # the first layer's q_proj reads normalised embeddings: route on their difference
        direction = embeddings[ord("a")] - embeddings[ord("b")]
        layer.router.copy_(torch.stack([direction, -direction]) * 1000)
    batch = lambda text: {"input_ids": torch.tensor([[ord(c) for c in text]] * 2)}  # noqa: E731
    apart = routing_by_task(model, {"as": [batch("aaaa")], "bs": [batch("bbbb")]})
    name = "model.layers.0.self_attn.q_proj"
    assert apart["tasks"] == ["as", "bs"] and apart["max_mutual_information"] == pytest.approx(math.log(2))
    assert apart["per_layer"][name]["mutual_information"] == pytest.approx(math.log(2), abs=1e-6)
    assert apart["per_layer"][name]["top_head_share"] == {"as": [1.0, 0.0], "bs": [0.0, 1.0]}
    assert apart["per_layer"][name]["mean_weight"]["as"][0] > 0.99
    alike = routing_by_task(model, {"one": [batch("abab")], "two": [batch("baba")]})
    assert alike["per_layer"][name]["mutual_information"] == pytest.approx(0.0, abs=1e-6)


def test_a_finished_runs_metrics_carry_the_evidence(tmp_path, tiny_model_path):
    """metrics.json (the job's metrics): learned-update similarity per layer and module, the
    routing-by-task table by each record's task label, and a gradient norm per step."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdef") for _ in range(4)) for _ in range(80)]
    mixed = tmp_path / "mixed.jsonl"  # one file, two task labels on its records
    mixed.write_text("".join(
        json.dumps({"prompt": f"{task} {w}", "completion": w[::-1] if task == "rev" else w.upper(), "task": task}) + "\n"
        for w in words for task in ("rev", "up")
    ))
    config = TrainConfig(
        base_model="tiny", mixture=[{"path": str(mixed), "task": "from_records"}],
        adapter={"method": "rlora", "heads": 3, "rank": 4, "target_modules": ["gate_proj", "down_proj"]},
        training=dict(max_steps=6, batch_size=4, learning_rate=5e-3, max_seq_len=32, eval_max_examples=16,
                      eval_max_new_tokens=4, checkpoint_every=100),
        output_dir=str(tmp_path / "out"),
    )
    metrics = train(config, cache_dir=tiny_model_path.parent)
    assert metrics == json.loads((tmp_path / "out" / "metrics.json").read_text())
    learned = metrics["head_similarity"]["learned_update"]
    assert len(learned["per_layer"]) == 4 and set(learned["per_module"]) == {"gate_proj", "down_proj"}
    assert -1 <= learned["mean"] <= 1
    by_task = metrics["routing"]["by_task"]
    assert sorted(by_task["tasks"]) == ["rev", "up"] and len(by_task["per_layer"]) == 4
    for stats in by_task["per_layer"].values():
        assert 0 <= stats["mutual_information"] <= by_task["max_mutual_information"] + 1e-9
        assert all(sum(share) == pytest.approx(1.0, abs=1e-5) for share in stats["top_head_share"].values())
    assert all(entry["grad_norm"] > 0 for entry in metrics["train_loss"])


def test_a_single_task_run_has_no_routing_by_task(tmp_path, tiny_model_path):
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": "ok"}) + "\n" for i in range(40)))
    config = TrainConfig(
        base_model="tiny", mixture=[{"path": str(data), "task": "one"}],
        adapter={"method": "hydralora", "target_modules": ["down_proj"]},
        training=dict(max_steps=2, batch_size=4, max_seq_len=24, eval_max_examples=4, eval_max_new_tokens=2, checkpoint_every=100),
        output_dir=str(tmp_path / "out"),
    )
    metrics = train(config, cache_dir=tiny_model_path.parent)
    assert metrics["routing"]["by_task"] is None
    # HydraLoRA's heads start at zero: the learned update is the heads, as the raw similarity says.
    assert metrics["head_similarity"]["learned_update"]["mean"] == pytest.approx(metrics["head_similarity"]["mean"])
