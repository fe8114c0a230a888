"""CUDA and bfloat16: run where a GPU is lent (skipped without one, see conftest.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import rlora
from rlora import AdapterConfig
from rlora.adapter.config import VARIANTS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_model_on_cuda_starts_at_base_and_trains(variant, tiny_model_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).cuda().eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).cuda().eval()
    rlora.attach(model, AdapterConfig(**VARIANTS[variant]))
    ids = torch.randint(0, 256, (4, 32), device="cuda")
    with torch.no_grad():
        # The adapter is float32; its delta at step 0 is exact up to bf16 rounding of the sum.
        torch.testing.assert_close(model(ids).logits.float(), base(ids).logits.float(), atol=2e-2, rtol=0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_trainer_runs_on_cuda_in_bfloat16(tmp_path, tiny_model_path):
    import json

    from rlora.training import TrainConfig, train

    data = tmp_path / "ok.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say ok {i}", "completion": "ok"}) + "\n" for i in range(40)))
    config = TrainConfig(
        base_model="tiny",
        mixture=[{"path": str(data), "task": "ok"}],
        training={"max_steps": 20, "batch_size": 8, "learning_rate": 3e-2, "max_seq_len": 32, "device": "cuda"},
        output_dir=str(tmp_path / "out"),
    )
    metrics = train(config, cache_dir=tiny_model_path.parent)
    assert metrics["train_loss"][-1]["loss"] < metrics["train_loss"][0]["loss"]
    assert metrics["peak_memory_bytes"] > 0
