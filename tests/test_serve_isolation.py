"""One tenant cannot hurt another's generations (issue 11): a request that fails fails alone,
an adapter that cannot be served is refused at load, and one tenant's queue and rows are
bounded while the others' requests start first."""

import time

import pytest
import torch
from adapters_support import perturbed_adapters
from safetensors.torch import load_file, save_file

from rlora import AdapterConfig
from rlora.serve import AdapterNotFinite, EngineOverloaded, GenerationParams, InferenceEngine, Limits, NonFiniteScores, RequestFailed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GATE_UP_DOWN = ["gate_proj", "up_proj", "down_proj"]
LONG = {"max_new_tokens": 60, "ignore_eos_token": True}


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory, tiny_model_path):
    configs = {
        "good": AdapterConfig(method="rlora", heads=3, rank=4, target_modules=GATE_UP_DOWN, seed=21),
        "other": AdapterConfig(method="hydralora", heads=2, rank=4, target_modules=GATE_UP_DOWN, seed=22),
        "overflows": AdapterConfig(method="rlora", heads=3, rank=4, target_modules=GATE_UP_DOWN, seed=23),
        "nan": AdapterConfig(method="lora", rank=4, target_modules=GATE_UP_DOWN, seed=24),
    }
    paths = perturbed_adapters(tiny_model_path, configs, tmp_path_factory.mktemp("isolation"))
    # Finite weights whose outputs overflow: they load, and their scores become inf/NaN.
    tensors = load_file(paths["overflows"] / "adapter_model.safetensors")
    tensors = {k: (v * 1e30 if k.endswith("lora_B") else v) for k, v in tensors.items()}
    save_file(tensors, paths["overflows"] / "adapter_model.safetensors")
    # A NaN weight, as a diverged job leaves it.
    tensors = load_file(paths["nan"] / "adapter_model.safetensors")
    name = next(k for k in tensors if k.endswith("lora_A"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, paths["nan"] / "adapter_model.safetensors")
    return paths


def engine_for(tiny_model_path, adapter_paths, **limits):
    engine = InferenceEngine(cache_dir=tiny_model_path.parent, device="cpu", limits=Limits(**limits))
    for adapter_id in ("good", "other", "overflows"):
        engine.adapter(adapter_id, adapter_paths[adapter_id])
    return engine


def ids(result):
    return [t.id for t in result.tokens]


def test_an_adapter_with_non_finite_weights_is_refused_at_load(tiny_model_path, adapter_paths):
    with InferenceEngine(cache_dir=tiny_model_path.parent, device="cpu") as engine:
        with pytest.raises(AdapterNotFinite, match="not finite"):
            engine.adapter("nan", adapter_paths["nan"])
        assert "nan" not in engine.adapters.ids()


def test_a_request_whose_scores_overflow_fails_alone_while_another_tenant_streams(tiny_model_path, adapter_paths):
    with engine_for(tiny_model_path, adapter_paths) as engine:
        expected = ids(engine.generate("the other tenant", LONG, adapter_id="good", tenant="b"))
        stream = engine.submit("the other tenant", LONG, adapter_id="good", tenant="b")
        events = stream.events(timeout=30)
        first = [next(events) for _ in range(3)]
        bad = engine.submit("overflow", {"max_new_tokens": 20, "do_sample": True, "seed": 1}, adapter_id="overflows", tenant="a")
        with pytest.raises(NonFiniteScores, match="'overflows' cannot be served"):
            bad.result(timeout=30)
        rest = list(events)
        assert [e.token.id for e in first + rest] == expected  # streamed on, token for token
        assert rest[-1].result.finish_reason == "length"


def test_a_prompt_that_fails_its_prefill_fails_alone(tiny_model_path, adapter_paths):
    """Out of memory cannot be caused on demand: the runner's prefill pass is made to raise it
    for one marked prompt, as a CUDA allocation failure would."""
    with engine_for(tiny_model_path, adapter_paths) as engine:
        runner = engine.base_model("tiny")
        expected = ids(engine.generate("steady", LONG, adapter_id="good", tenant="b"))
        marked = runner.encode("out of memory here", GenerationParams())[0]
        prefill = runner._prefill_forward

        def failing(rows, chunks):
            if any(r.prompt == marked for r in rows):
                raise MemoryError("CUDA out of memory (injected)")
            return prefill(rows, chunks)

        runner._prefill_forward = failing
        steady = engine.submit("steady", LONG, adapter_id="good", tenant="b")
        next(steady.events(timeout=30))
        doomed = engine.submit("out of memory here", LONG, adapter_id="other", tenant="a")
        with pytest.raises(RequestFailed, match="could not be processed"):
            doomed.result(timeout=30)
        assert ids(steady.result(timeout=60)) == expected
        runner._prefill_forward = prefill
        assert engine.generate("after", {"max_new_tokens": 3}, adapter_id="other").generated_tokens == 3


def test_one_tenant_cannot_fill_the_queue_or_the_batch(tiny_model_path, adapter_paths):
    limits = dict(max_batch_size=4, max_pending_per_tenant=3, max_running_per_tenant=2)
    with engine_for(tiny_model_path, adapter_paths, **limits) as engine:
        runner = engine.base_model("tiny")
        def hog(i):
            return engine.submit(f"hog {i}", {"max_new_tokens": 200, "ignore_eos_token": True}, adapter_id="good", tenant="a")

        hogs = [hog(0), hog(1)]
        deadline = time.monotonic() + 10
        while runner.running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        hogs += [hog(i) for i in range(2, 5)]
        assert runner.running == 2 and runner.pending == 3  # two rows, three waiting: its share
        with pytest.raises(EngineOverloaded, match="3 of your requests are waiting"):
            engine.submit("one more", {"max_new_tokens": 5}, adapter_id="good", tenant="a")
        # Another tenant is admitted at once into the rows the first may not take.
        other = engine.submit("another tenant", {"max_new_tokens": 5, "ignore_eos_token": True}, adapter_id="other", tenant="b")
        assert other.result(timeout=30).generated_tokens == 5
        assert not any(h.done() for h in hogs)
        for handle in hogs:
            handle.cancel()


def test_rows_go_round_robin_across_waiting_tenants(tiny_model_path, adapter_paths):
    with engine_for(tiny_model_path, adapter_paths, max_batch_size=1) as engine:
        blocker = engine.submit("blocker", {"max_new_tokens": 30, "ignore_eos_token": True}, adapter_id="good", tenant="a")
        next(blocker.events(timeout=30))
        order = []
        params = {"max_new_tokens": 2, "ignore_eos_token": True}
        handles = [engine.submit(f"a{i}", params, adapter_id="good", tenant="a") for i in range(3)]
        handles += [engine.submit("b0", params, adapter_id="other", tenant="b")]
        for handle, name in zip(handles, ["a0", "a1", "a2", "b0"]):
            handle._future.add_done_callback(lambda _, n=name: order.append(n))
        for handle in handles:
            handle.result(timeout=60)
        assert order.index("b0") <= 1  # b's one request went right after a's first, not after all three
        blocker.result(timeout=30)


def test_a_tenant_over_its_token_rate_starts_later_than_the_others(tiny_model_path, adapter_paths):
    with engine_for(tiny_model_path, adapter_paths, max_tokens_per_second_per_tenant=20.0) as engine:
        engine.generate("spend", {"max_new_tokens": 60, "ignore_eos_token": True}, adapter_id="good", tenant="a")  # 40 over
        start = time.monotonic()
        held = engine.submit("held back", {"max_new_tokens": 2, "ignore_eos_token": True}, adapter_id="good", tenant="a")
        free = engine.submit("not held", {"max_new_tokens": 2, "ignore_eos_token": True}, adapter_id="other", tenant="b")
        free.result(timeout=30)
        free_done = time.monotonic() - start
        held.result(timeout=30)
        held_done = time.monotonic() - start
        assert free_done < 1.0 and held_done > 1.0  # about 2 s of debt at 20 tokens a second
