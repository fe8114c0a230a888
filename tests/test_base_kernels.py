"""The frozen model's kernels (rlora.training.base_kernels): the answer-only loss equals the loss
of the full logits, with and without Liger's fused linear cross-entropy (run on the CPU through
Triton's interpreter, tests/conftest.py), and the setting's rules."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import rlora
from rlora import AdapterConfig
from rlora.data import IGNORE_INDEX
from rlora.training.base_kernels import answer_loss_sum, apply_base_kernels
from rlora.training.config import TrainingSettings
from rlora.training.evaluate import token_loss_sum


@pytest.fixture
def adapted(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    rlora.attach(model, AdapterConfig(method="rlora", heads=3, rank=4, dropout=0.0, target_modules=["gate_proj", "down_proj"]))
    return model.train()


def batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # the prompt
    labels[2, 9:] = IGNORE_INDEX  # padding
    return ids, mask, labels


def adapter_grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("fused", [False, True], ids=["answer-rows", "liger-fused-linear-ce"])
def test_answer_loss_equals_the_full_logits_loss_and_its_gradients(adapted, fused):
    if fused:
        pytest.importorskip("liger_kernel")
    ids, mask, labels = batch()
    want = token_loss_sum(adapted(input_ids=ids, attention_mask=mask).logits, labels)
    want.backward()
    want_grads = adapter_grads(adapted)
    adapted.zero_grad()
    got = answer_loss_sum(adapted, ids, mask, labels, fused_cross_entropy=fused)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(adapter_grads(adapted), want_grads):
        # Liger's chunked cross-entropy sums its gradient in another order than autograd does.
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_base_kernels_setting(adapted):
    cpu = torch.device("cpu")
    assert TrainingSettings().base_kernels == "auto"
    assert not apply_base_kernels(adapted, "auto", cpu)  # auto: CUDA only
    assert not apply_base_kernels(adapted, "none", cpu)
    with pytest.raises(ValueError, match="needs CUDA"):
        apply_base_kernels(adapted, "liger", cpu)
    with pytest.raises(ValueError):
        TrainingSettings(base_kernels="unsloth")
