"""The memory estimate of a run (rlora.training.memory) against what a run on the CPU holds, and
the service refusing, before it is queued, a job that fits none of its devices."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest_service import make_settings, upload
from transformers import AutoModelForCausalLM, LlamaConfig

import rlora
from rlora import AdapterConfig
from rlora.training.base_kernels import answer_loss_sum
from rlora.training.config import TrainingSettings
from rlora.training.memory import DeviceCapacity, estimate_training_memory, memory_problem

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from bench_memory import shapes  # noqa: E402
from bench_support import saved_activation_bytes  # noqa: E402

MID = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  vocab_size=2000, max_position_embeddings=512)
LLAMA_3_70B = shapes()["Llama-3-70B"]
ADAPTER = AdapterConfig(method="rlora", heads=3, rank=8)


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_holds_what_a_step_keeps_on_the_cpu(checkpointing):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MID, attn_implementation="sdpa")
    rlora.attach(model, ADAPTER)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    training = TrainingSettings(max_steps=1, batch_size=4, max_seq_len=128, gradient_checkpointing=checkpointing)
    estimate = estimate_training_memory(meta_model(MID), ADAPTER, training, on_cuda=False)

    # The weights and the adapter to the byte: the frozen base in float32, the adapter with its
    # gradients and AdamW's moments after one step.
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
    assert estimate.weights == base_bytes
    ids = torch.randint(0, MID.vocab_size, (4, 128))
    mask = torch.ones_like(ids)
    optimizer = torch.optim.AdamW(trainable)
    answer_loss_sum(model, ids, mask, ids.clone()).backward()
    optimizer.step()
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    adapter_bytes = sum(t.numel() * t.element_size() for t in trainable) * 2 + moments  # weights, gradients, moments
    adapter_bytes += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "lora" in n or "router" in n)
    assert estimate.adapter == adapter_bytes

    # What autograd keeps for backward (a checkpointed layer's recompute happens in backward,
    # which this does not see): the estimate is above it, and without checkpointing close to it.
    saved = saved_activation_bytes(lambda: answer_loss_sum(model, ids, mask, ids.clone()), frozen + trainable + [ids, mask])
    assert saved <= estimate.activations + estimate.logits
    if not checkpointing:
        assert estimate.activations + estimate.logits <= 1.5 * saved


def test_nf4_weights_are_what_bitsandbytes_stores(tiny_model_path):
    pytest.importorskip("bitsandbytes")
    from rlora.basemodels import load_base_model

    model, _ = load_base_model(tiny_model_path, quantization="nf4")
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    stored += sum(t.numel() * t.element_size() for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None)
                  for t in _quant_state_tensors(m.weight.quant_state))
    estimate = estimate_training_memory(meta_model(model.config), ADAPTER, TrainingSettings(quantization="nf4"), on_cuda=False)
    # Each quantized layer also stores the 256-value NF4 code (1 KiB): a few percent of the tiny
    # model's small layers, nothing at real sizes.
    assert estimate.weights == pytest.approx(stored, rel=0.05)


def _quant_state_tensors(state):
    tensors = [state.absmax]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def test_a_run_too_big_for_the_device_names_the_setting_and_what_fits():
    model = meta_model(shapes()["Llama-3-8B"])
    gpu = DeviceCapacity(24 * 10**9, cuda=True, name="24 GB GPU")
    training = TrainingSettings(max_steps=10, batch_size=4, max_seq_len=1024)
    problem = memory_problem(model, ADAPTER, training, gpu)
    assert problem.field == "training.batch_size"
    assert "activations weigh most" in problem.message and "It would fit with training.gradient_checkpointing: true" in problem.message
    fitting = training.model_copy(update={"gradient_checkpointing": True})
    assert memory_problem(model, ADAPTER, fitting, gpu) is None


def test_a_70b_job_on_a_service_of_one_24_gb_gpu_is_a_422_that_says_why(tmp_path, service_settings):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.auth import create_tenant

    models = tmp_path / "models"
    (models / "llama-3-70b").mkdir(parents=True)
    (models / "llama-3-70b" / "config.json").write_text(LLAMA_3_70B.to_json_string())
    settings = make_settings(tmp_path / "home", service_settings.database, models_dir=models, gpu_memory_bytes=24 * 10**9)
    app = create_app(settings)
    with TestClient(app) as client:
        with app.state.db.session() as session:
            _, key = create_tenant(session, f"big-{tmp_path.name}")
        headers = {"Authorization": f"Bearer {key}"}
        records = "".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(8))
        file_id = upload(client, headers, records).json()["id"]
        body = {"base_model": "llama-3-70b", "mixture": [{"file_id": file_id, "weight": 1.0, "task": "qa"}],
                "adapter": {"method": "rlora", "heads": 3, "rank": 8},
                "training": {"max_steps": 10, "batch_size": 4, "max_seq_len": 1024, "device": "cuda"}}
        response = client.post("/v1/jobs", headers=headers, json=body)
        assert response.status_code == 422, response.text
        assert client.get("/v1/jobs", headers=headers).json()["data"] == []
    problems = {p["field"]: p["message"] for p in response.json()["error"]["details"]}
    message = problems["training.quantization"]
    assert "over the 22.4 GiB" in message and "weights weigh most" in message
    assert "Nothing fits one such device" in message and "training.quantization: nf4" in message


def test_the_memory_benchmark_prints_its_tables(tmp_path):
    import subprocess

    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_memory.py"), "--measure", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| Llama-3-70B | nf4 + ckpt |" in done.stdout and "| 24 GB | Llama-3-8B | Llama-3-8B |" in done.stdout
    rows = json.loads(out.read_text())["estimates"]
    assert len(rows) == 5 * 4 and all(row["total"] > 0 for row in rows)
    if not torch.cuda.is_available():
        assert "--measure needs CUDA: not measured" in done.stdout
