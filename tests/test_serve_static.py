"""The serving path's static shapes (rlora.serve): slot KV cache, adapter slot tables, chunked
prefill, bucketed decode steps. Exactness against transformers' own eager generation with the
training-time layer, and the behaviour the fixed tables bring (adapters waiting for a slot,
tables growing, long prompts in chunks between decode steps)."""

import time

import pytest
import torch
from adapters_support import perturbed_adapters
from transformers import AutoModelForCausalLM

import rlora
from rlora import AdapterConfig
from rlora.serve import InferenceEngine, Limits
from rlora.serve.batch import bucket
from rlora.tiny import TINY_CONFIG

BOS = TINY_CONFIG["bos_token_id"]
ADAPTERS = {
    "small": AdapterConfig(method="hydralora", heads=2, rank=2, target_modules=["q_proj", "down_proj"], seed=11),
    "rl": AdapterConfig(method="rlora", heads=3, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=12),
    "lo": AdapterConfig(method="lora", rank=8, target_modules=["q_proj", "o_proj", "up_proj"], seed=13),
    "big": AdapterConfig(method="rlora", heads=5, rank=6, target_modules="all-linear", seed=14),
}
GREEDY = {"max_new_tokens": 16, "ignore_eos_token": True}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory, tiny_model_path):
    return perturbed_adapters(tiny_model_path, ADAPTERS, tmp_path_factory.mktemp("static-adapters"))


@pytest.fixture(scope="module")
def workdir(tiny_model_path):
    """The built-models cache the engines resolve "tiny" in."""
    return tiny_model_path.parent


@pytest.fixture(scope="module")
def model_dir(tiny_model_path):
    return tiny_model_path


def engine_for(workdir, adapter_paths, **limits) -> InferenceEngine:
    engine = InferenceEngine(cache_dir=workdir, device="cpu", limits=Limits(**limits))
    for adapter_id, path in adapter_paths.items():
        engine.adapter(adapter_id, path)
    return engine


def ids(result):
    return [t.id for t in result.tokens]


def reference_tokens(model_dir, adapter_path, text, new_tokens):
    """transformers' own greedy generation with the training-time layer (eager, dynamic cache)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter_path is not None:
        model = rlora.load(model, adapter_path).eval()
    prompt = torch.tensor([[BOS] + list(text.encode())])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=TINY_CONFIG["pad_token_id"])
    return out[0, prompt.shape[1]:].tolist()


def test_greedy_tokens_equal_transformers_generate_with_the_training_layer(workdir, model_dir, adapter_paths):
    """Mixed in one batch (slot tables padded to the largest adapter, rows of other lengths), each
    request makes the tokens transformers' eager `generate` makes with its adapter alone."""
    requests = [("rl", "the slot tables"), ("small", "a"), (None, "base model row, longer than the rest"),
                ("lo", "plain lora"), ("big", "the largest adapter, all linears")]
    with engine_for(workdir, adapter_paths) as engine:
        handles = [engine.submit(text, GREEDY, **({"adapter_id": a} if a else {"base_model": "tiny"})) for a, text in requests]
        got = [ids(h.result(timeout=60)) for h in handles]
        assert engine.base_model("tiny").max_rows == len(requests)
    expected = [reference_tokens(model_dir, adapter_paths[a] if a else None, text, GREEDY["max_new_tokens"]) for a, text in requests]
    assert got == expected
    assert len({tuple(t) for t in expected}) == len(expected)


def test_tables_grow_for_a_larger_adapter_without_changing_the_others(workdir, adapter_paths):
    with engine_for(workdir, {"small": adapter_paths["small"]}) as engine:
        runner = engine.base_model("tiny")
        before = ids(engine.generate("grow", GREEDY, adapter_id="small"))
        version = runner.adapter_slots.version
        engine.adapter("big", adapter_paths["big"])
        handles = [engine.submit("grow", GREEDY, adapter_id="small"), engine.submit("grow", GREEDY, adapter_id="big")]
        small, big = [ids(h.result(timeout=60)) for h in handles]
        assert runner.adapter_slots.version > version  # rank, heads and layers grew
        assert small == before and big != before


def test_more_adapters_than_slots_wait_for_a_slot(workdir, adapter_paths):
    """With two adapter slots, four adapters in flight: the others wait in the queue for a slot
    and every request still makes its own tokens."""
    order = ["rl", "small", "lo", "big", "rl", "lo"]
    with engine_for(workdir, adapter_paths) as roomy:
        expected = [ids(roomy.generate(f"slot {i}", GREEDY, adapter_id=a)) for i, a in enumerate(order)]
    with engine_for(workdir, adapter_paths, max_batch_adapters=2) as engine:
        handles = [engine.submit(f"slot {i}", GREEDY, adapter_id=a) for i, a in enumerate(order)]
        assert [ids(h.result(timeout=60)) for h in handles] == expected
        runner = engine.base_model("tiny")
        assert runner.max_rows <= 3  # two adapters at once: at most one of them twice (rl or lo); 6 without the bound
        assert runner.adapter_slots.capacity == 2


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(workdir, adapter_paths):
    long_text = "a prompt many chunks long " * 6  # 157 tokens: 20 chunks of 8
    with engine_for(workdir, adapter_paths) as whole:
        expected_long = ids(whole.generate(long_text, GREEDY, adapter_id="rl"))
        expected_running = ids(whole.generate("running", {"max_new_tokens": 120, "ignore_eos_token": True}, adapter_id="lo"))
    with engine_for(workdir, adapter_paths, prefill_chunk_tokens=8) as engine:
        running = engine.submit("running", {"max_new_tokens": 120, "ignore_eos_token": True}, adapter_id="lo")
        events = running.events(timeout=30)
        for _ in range(3):
            next(events)
        steps_before = engine.base_model("tiny").steps
        long = engine.submit(long_text, GREEDY, adapter_id="rl")
        first = next(long.events(timeout=30))
        steps_at_first_token = engine.base_model("tiny").steps
        assert first.index == 1
        # The running request kept decoding while the long prompt went in, chunk by chunk.
        assert steps_at_first_token - steps_before >= 157 // 8 - 1
        assert ids(long.result(timeout=60)) == expected_long
        assert ids(running.result(timeout=60)) == expected_running


def test_rows_are_reused_and_the_decode_batch_stays_dense(workdir, adapter_paths):
    with engine_for(workdir, adapter_paths, max_batch_size=4) as engine:
        runner = engine.base_model("tiny")
        texts = [f"row {i}" for i in range(10)]
        expected = [ids(engine.generate(t, {"max_new_tokens": 3 + i, "ignore_eos_token": True}, adapter_id="rl")) for i, t in enumerate(texts)]
        handles = [engine.submit(t, {"max_new_tokens": 3 + i, "ignore_eos_token": True}, adapter_id="rl") for i, t in enumerate(texts)]
        assert [ids(h.result(timeout=60)) for h in handles] == expected
        assert runner.max_rows == 4
        deadline = time.monotonic() + 10
        while runner.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.running == 0


def test_bucket_sizes():
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 33, 64, 70)] == [1, 2, 4, 8, 64, 64, 64]
    assert bucket(3, 1024, smallest=64) == 64 and bucket(65, 100, smallest=64) == 100


def test_a_freed_row_between_decoding_rows_reads_a_slot_in_range(workdir, adapter_paths):
    """A short request on a third adapter leaves a row in the middle of the batch; the step still
    reads that row (its output unused) and must find a slot among those it reads."""
    order = [("rl", 40), ("small", 40), ("lo", 2), ("rl", 40)]
    with engine_for(workdir, adapter_paths) as engine:
        expected = [ids(engine.generate(f"row {i}", {"max_new_tokens": n, "ignore_eos_token": True}, adapter_id=a)) for i, (a, n) in enumerate(order)]
        handles = [engine.submit(f"row {i}", {"max_new_tokens": n, "ignore_eos_token": True}, adapter_id=a) for i, (a, n) in enumerate(order)]
        assert [ids(h.result(timeout=60)) for h in handles] == expected


def test_a_cancelled_request_leaves_the_queue_while_every_row_is_busy(workdir, adapter_paths):
    from rlora.serve import RequestCancelled

    with engine_for(workdir, adapter_paths, max_batch_size=1) as engine:
        busy = engine.submit("busy", {"max_new_tokens": 400, "ignore_eos_token": True}, adapter_id="rl")
        next(busy.events(timeout=30))
        queued = engine.submit("queued", GREEDY, adapter_id="lo")
        queued.cancel()
        with pytest.raises(RequestCancelled):
            queued.result(timeout=5)
        assert not busy.done() and engine.base_model("tiny").pending == 0
        busy.cancel()
