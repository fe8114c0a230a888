"""One tenant cannot hurt another's generations (issue 11): a request that fails fails alone,
an adapter that cannot be served is refused at load, and one tenant's queue and rows are
bounded while the others' requests start first."""

import threading
import time

import pytest
from adapters_support import perturbed_adapters
from safetensors.torch import load_file, save_file

from rlora import AdapterConfig
from rlora.serve import AdapterUnusable, EngineOverloaded, GenerationParams, InferenceEngine, Limits, NonFiniteScores, RequestFailed

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
        with pytest.raises(AdapterUnusable, match="not finite"):
            engine.adapter("nan", adapter_paths["nan"])
        assert "nan" not in engine.adapters.ids()


def test_a_request_whose_scores_overflow_fails_alone_while_another_tenant_streams(tiny_model_path, adapter_paths):
    with engine_for(tiny_model_path, adapter_paths) as engine:
        expected = ids(engine.generate("the other tenant", LONG, adapter_id="good", tenant="b"))
        expected_next = ids(engine.generate("the next one", LONG, adapter_id="other", tenant="c"))
        stream = engine.submit("the other tenant", LONG, adapter_id="good", tenant="b")
        events = stream.events(timeout=30)
        first = [next(events) for _ in range(3)]
        bad = engine.submit("overflow", {"max_new_tokens": 20, "do_sample": True, "seed": 1}, adapter_id="overflows", tenant="a")
        with pytest.raises(NonFiniteScores, match="'overflows' cannot be served"):
            bad.result(timeout=30)
        # The next request takes the failed one's row (the lowest free): its NaN keys are gone.
        assert ids(engine.generate("the next one", LONG, adapter_id="other", tenant="c")) == expected_next
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
        expected_bystander = ids(engine.generate("a bystander", LONG, adapter_id="other", tenant="c"))
        steady = engine.submit("steady", LONG, adapter_id="good", tenant="b")
        next(steady.events(timeout=30))
        # The doomed prompt and a bystander's arrive together: one prefill pass, which fails;
        # each is tried again alone, and only the doomed one fails.
        pause = threading.Thread(target=runner.call, args=(lambda: time.sleep(0.3),))
        pause.start()
        time.sleep(0.05)
        doomed = engine.submit("out of memory here", LONG, adapter_id="other", tenant="a")
        bystander = engine.submit("a bystander", LONG, adapter_id="other", tenant="c")
        pause.join()
        with pytest.raises(RequestFailed, match="could not be processed"):
            doomed.result(timeout=30)
        assert ids(bystander.result(timeout=60)) == expected_bystander
        assert ids(steady.result(timeout=60)) == expected
        runner._prefill_forward = prefill
        assert engine.generate("after", {"max_new_tokens": 3}, adapter_id="other").generated_tokens == 3


def test_one_tenant_cannot_fill_the_queue_or_keep_the_rows(tiny_model_path, adapter_paths):
    limits = dict(max_batch_size=4, max_pending_per_tenant=2, max_running_per_tenant=2)
    with engine_for(tiny_model_path, adapter_paths, **limits) as engine:
        runner = engine.base_model("tiny")

        def submit(text, tokens, tenant):
            return engine.submit(text, {"max_new_tokens": tokens, "ignore_eos_token": True}, adapter_id="good", tenant=tenant)

        # Alone, a tenant may use every row (its cap of 2 holds only while others wait).
        hogs = []
        for pair in ((0, 1), (2, 3)):  # two at a time: its share of the queue is two
            hogs += [submit(f"hog {i}", 20 + 15 * i, "a") for i in pair]
            deadline = time.monotonic() + 10
            while runner.running < len(hogs) and time.monotonic() < deadline:
                time.sleep(0.005)
        assert runner.running == 4
        waiting = [submit(f"hog {i}", 5, "a") for i in (4, 5)]
        with pytest.raises(EngineOverloaded, match="2 of your requests are waiting"):
            submit("one more", 5, "a")  # its share of the queue is full; the queue is not
        started = {}
        other = submit("another tenant", 5, "b")
        for name, handle in [("b", other), ("a4", waiting[0]), ("a5", waiting[1])]:
            next(handle.events(timeout=60))
            started[name] = time.monotonic()
        # The first row to free goes to the other tenant, not to the first tenant's next request.
        assert started["b"] <= min(started["a4"], started["a5"])
        for handle in hogs + waiting + [other]:
            handle.result(timeout=60)


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


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def queued(tenant: str, max_new: int = 10):
    from rlora.serve.detokenize import IncrementalDecoder
    from rlora.serve.handle import RequestHandle
    from rlora.serve.request import ActiveRequest
    from rlora.serve.stopping import StopCriteria

    params = GenerationParams(max_new_tokens=max_new)
    return ActiveRequest(
        handle=RequestHandle(0, params, 1), params=params, adapter=None, prompt=[1], prompt_text="",
        stopping=StopCriteria(max_new, frozenset(), ()), decoder=IncrementalDecoder(lambda ids: "", [1]), tenant=tenant,
    )


def test_a_tenant_over_its_token_rate_waits_for_its_allowance():
    """20 tokens a second: a request reserves its max_new_tokens when it starts (the allowance may
    go below zero by one request), gives back what it did not use, and the tenant's next request
    waits until the allowance is above zero again; another tenant is not held."""
    from rlora.serve.queues import TenantQueues

    clock = FakeClock()
    queues = TenantQueues(Limits(max_tokens_per_second_per_tenant=20.0), clock)
    first, second, other = queued("a", 60), queued("a", 10), queued("b", 10)
    for request in (first, second, other):
        queues.add(request)
    assert queues.take(4, {}) == [first, other]  # a's allowance: 20 - 60 = -40, so second waits
    clock.now = 1.9
    assert queues.take(4, {}) == []  # -40 + 38 = -2
    first.generated_count = 30
    queues.refund(first)  # 30 unused tokens back: -2 + 30 = 28
    assert queues.take(4, {}) == [second]
    assert len(queues) == 0 and first.reserved_tokens == 0


def test_queues_put_back_sweep_and_drain_keep_count():
    from rlora.serve.queues import TenantQueues

    queues = TenantQueues(Limits(max_queue=5, max_pending_per_tenant=3))
    a = [queued("a") for _ in range(3)]
    b = [queued("b") for _ in range(2)]
    for request in a + b:
        queues.add(request)
    with pytest.raises(EngineOverloaded):
        queues.add(queued("c"))  # the whole queue is full
    taken = queues.take(3, {})
    assert taken == [a[0], b[0], a[1]] and len(queues) == 2
    queues.put_back(taken)
    assert len(queues) == 5 and queues.waiting("a") == 3
    b[1].handle.cancel()
    queues.sweep_cancelled()
    assert len(queues) == 4 and queues.waiting("b") == 1
    assert sorted(map(id, queues.take(10, {}))) == sorted(map(id, [b[0], *a])) and len(queues) == 0
    queues.add(b[0])
    assert queues.drain() == [b[0]] and len(queues) == 0
