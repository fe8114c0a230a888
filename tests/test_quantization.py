"""A quantized frozen base (QLoRA, rlora.quantization) on bitsandbytes' CPU backend: the adapter
starts exactly at the quantized model, trains, records the form it was trained over, keeps the
base model's fingerprint, and is served over a base loaded the same way."""

import json

import pytest
import torch

import rlora
from rlora import AdapterConfig
from rlora.adapter.folder import base_model_fingerprint
from rlora.basemodels import load_base_model
from rlora.training import TrainConfig, train
from rlora.training.checkpoint import run_fingerprint

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[5, 40, 41, 42, 43, 10, 66, 67], [7, 8, 9, 70, 71, 72, 73, 74]])


def quantized(tiny_model_path, quantization):
    model, _ = load_base_model(tiny_model_path, dtype=torch.float32, device="cpu", quantization=quantization)
    return model.eval()


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_the_adapter_starts_at_the_quantized_model_and_keeps_the_base_fingerprint(tiny_model_path, quantization):
    base = quantized(tiny_model_path, quantization)
    adapted = quantized(tiny_model_path, quantization)
    layer = adapted.model.layers[0].mlp.gate_proj
    assert type(layer.weight).__name__ in ("Params4bit", "Int8Params")
    rlora.attach(adapted, AdapterConfig(method="rlora", heads=3, rank=4, target_modules="all-linear"))
    with torch.no_grad():
        torch.testing.assert_close(adapted(IDS).logits, base(IDS).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(base(IDS).logits, load_base_model(tiny_model_path)[0].eval()(IDS).logits, atol=1e-3)
    full, _ = load_base_model(tiny_model_path)
    assert base_model_fingerprint(adapted) == base_model_fingerprint(full)


def test_an_unknown_form_is_refused_by_name():
    from pydantic import ValidationError

    from rlora.training.config import TrainingSettings

    with pytest.raises(ValidationError, match="quantization"):
        TrainingSettings(quantization="nf3")


@pytest.fixture(scope="module")
def nf4_run(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    data = root / "ok.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say ok {i}", "completion": "ok"}) + "\n" for i in range(40)))
    config = TrainConfig(
        base_model="tiny", mixture=[{"path": str(data), "task": "ok"}], output_dir=str(root / "out"),
        training={"max_steps": 12, "batch_size": 8, "learning_rate": 3e-2, "max_seq_len": 32, "quantization": "nf4",
                  "eval_max_examples": 4},
    )
    return config, train(config, cache_dir=tiny_model_path.parent)


def test_a_job_trains_over_an_nf4_base_and_records_it(nf4_run, tiny_model_path):
    config, metrics = nf4_run
    losses = [row["loss"] for row in metrics["train_loss"]]
    assert losses[-1] < losses[0] / 2
    assert metrics["quantization"] == "nf4"
    adapter_dir = f"{config.output_dir}/adapter"
    meta = json.loads(open(f"{adapter_dir}/adapter_config.json").read())
    assert meta["base_model_quantization"] == "nf4"
    # Its fingerprint is the base model's: it loads over the full-precision base as well.
    full, _ = load_base_model(tiny_model_path)
    rlora.load(full, adapter_dir)
    # The quantization is part of the run: the same job over a full base is another run.
    unquantized = config.model_copy(update={"training": config.training.model_copy(update={"quantization": "none"})})
    assert run_fingerprint(unquantized) != run_fingerprint(config)


def test_the_engine_serves_it_over_an_nf4_base_batched_with_full_precision_requests(nf4_run, tiny_model_path):
    from rlora.serve import InferenceEngine

    config, _ = nf4_run
    adapter_dir = f"{config.output_dir}/adapter"
    greedy = {"max_new_tokens": 6, "ignore_eos_token": True}
    with InferenceEngine(cache_dir=tiny_model_path.parent, device="cpu") as engine:
        adapter = engine.adapter("qlora", adapter_dir)
        assert adapter.quantization == "nf4"
        served = engine.generate("say ok 3", greedy, adapter_id="qlora", timeout=120)
        plain = engine.generate("say ok 3", greedy, base_model="tiny", timeout=120)
        assert sorted(engine.loaded_base_models()) == ["tiny", "tiny@nf4"]
        logits = engine.logits([IDS[0].tolist()], ["qlora"], base_model="tiny")[0]
    # The same adapter over the same nf4 base, outside the engine.
    reference = rlora.load(quantized(tiny_model_path, "nf4"), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(IDS[:1]).logits[0], rtol=0, atol=1e-4)
    assert len(served.tokens) == len(plain.tokens) == 6
