"""The serving path on CUDA (run where a GPU is lent; skipped without one, see conftest.py):
decode steps captured as CUDA graphs give the tokens the uncaptured steps give, another mix of
adapters replays the same graphs, and bfloat16 serving agrees with training-time eval."""

import threading
import time

import pytest
import torch
from adapters_support import perturbed_adapters
from transformers import AutoModelForCausalLM

import rlora
from rlora import AdapterConfig
from rlora.serve import InferenceEngine, Limits
from rlora.tiny import TINY_CONFIG

pytestmark = pytest.mark.gpu

ADAPTERS = {
    "a": AdapterConfig(method="rlora", heads=3, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=1),
    "b": AdapterConfig(method="hydralora", heads=2, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=2),
    "c": AdapterConfig(method="rlora", heads=3, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=3),
    "d": AdapterConfig(method="lora", rank=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=4),
}
GREEDY = {"max_new_tokens": 24, "ignore_eos_token": True}
TEXTS = ["graphs", "a longer prompt than the first", "x", "the fourth row"]


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory, tiny_model_path):
    return perturbed_adapters(tiny_model_path, ADAPTERS, tmp_path_factory.mktemp("gpu-adapters"))


def run_batch(engine, adapters):
    """All rows admitted together (the loop held while they are queued), so a batch's steps have
    the same shapes whatever the timing (a row alone first would be a step of another shape)."""
    runner = engine.base_model("tiny")
    hold = threading.Thread(target=runner.call, args=(lambda: time.sleep(0.3),))
    hold.start()
    time.sleep(0.05)
    handles = [engine.submit(text, GREEDY, adapter_id=a) for a, text in zip(adapters, TEXTS)]
    hold.join()
    return [[t.id for t in h.result(timeout=120).tokens] for h in handles]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_decode_steps_equal_uncaptured_ones(tiny_model_path, adapter_paths, dtype):
    outputs = {}
    for graphs in (True, False):
        # Two adapter slots: the second batch's adapters take the first's slots.
        limits = Limits(max_batch_adapters=2)
        with InferenceEngine(cache_dir=tiny_model_path.parent, device="cuda", dtype=dtype, cuda_graphs=graphs, limits=limits) as engine:
            for adapter_id, path in adapter_paths.items():
                engine.adapter(adapter_id, path)
            runner = engine.base_model("tiny")
            first = run_batch(engine, ["a", "b", "a", "b"])
            captured = len(runner.graphs)
            # Other adapters in the same slots and rows: the same shapes, so no new capture.
            second = run_batch(engine, ["c", "d", "c", "d"])
            if graphs:
                assert captured > 0 and len(runner.graphs) == captured
            outputs[graphs] = (first, second)
    assert outputs[True] == outputs[False]


def test_float32_tokens_equal_transformers_generate(tiny_model_path, adapter_paths):
    with InferenceEngine(cache_dir=tiny_model_path.parent, device="cuda", dtype=torch.float32) as engine:
        for adapter_id, path in adapter_paths.items():
            engine.adapter(adapter_id, path)
        got = run_batch(engine, ["a", "b", "c", "d"])
    for adapter_id, text, tokens in zip("abcd", TEXTS, got):
        model = rlora.load(AutoModelForCausalLM.from_pretrained(tiny_model_path), adapter_paths[adapter_id]).cuda().eval()
        prompt = torch.tensor([[TINY_CONFIG["bos_token_id"]] + list(text.encode())], device="cuda")
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY["max_new_tokens"],
                                 do_sample=False, eos_token_id=None, pad_token_id=TINY_CONFIG["pad_token_id"])
        assert tokens == out[0, prompt.shape[1]:].tolist()


def test_bfloat16_logits_agree_with_training_time_eval(tiny_model_path, adapter_paths):
    seqs = [[TINY_CONFIG["bos_token_id"]] + list(t.encode()) for t in TEXTS[:2]]
    with InferenceEngine(cache_dir=tiny_model_path.parent, device="cuda", dtype=torch.bfloat16) as engine:
        for adapter_id in "ab":
            engine.adapter(adapter_id, adapter_paths[adapter_id])
        got = engine.logits(seqs, ["a", "b"], base_model="tiny")
    for seq, adapter_id, logits in zip(seqs, "ab", got):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).cuda()
        model = rlora.load(base, adapter_paths[adapter_id]).eval()
        with torch.no_grad():
            expected = model(torch.tensor([seq], device="cuda")).logits[0]
        torch.testing.assert_close(logits.float(), expected.float().cpu(), rtol=0, atol=4e-3)


def test_steps_are_captured_again_after_the_tables_grow(tiny_model_path, adapter_paths, tmp_path):
    """A larger adapter reallocates the slot tables, which drops every graph and their memory
    pool; the next captures must start a new pool (capturing into the freed one failed on an
    H200, and serving fell back to uncaptured steps)."""
    big = AdapterConfig(method="rlora", heads=5, rank=8, target_modules="all-linear", seed=9)
    big_path = perturbed_adapters(tiny_model_path, {"big": big}, tmp_path)["big"]
    with InferenceEngine(cache_dir=tiny_model_path.parent, device="cuda", dtype=torch.bfloat16) as engine:
        engine.adapter("a", adapter_paths["a"])
        runner = engine.base_model("tiny")
        run_batch(engine, ["a"] * 4)
        assert len(runner.graphs) > 0
        engine.adapter("big", big_path)
        run_batch(engine, ["big", "a", "big", "a"])
        assert runner.graphs.enabled and len(runner.graphs) > 0
