"""The inference engine (rlora.serve) on the tiny model: equality with training-time
R-LoRA in eval mode, batching across adapters, continuous batching, per-request parameters,
limits, the adapter cache, routing summaries, and the async/cancellation API."""

import asyncio
import json
import threading
import time

import pytest
import torch
from adapters_support import perturbed_adapters, rewrite_as_format_v1
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlora
from rlora import AdapterConfig, AdapterMismatchError
from rlora.adapter import routing_summary
from rlora.serve import (
    EngineOverloaded,
    GenerationValidationError,
    InferenceEngine,
    Limits,
    RequestCancelled,
)
from rlora.tiny import TINY_CONFIG

BOS, EOS = TINY_CONFIG["bos_token_id"], TINY_CONFIG["eos_token_id"]
ADAPTERS = {
    # id: (config, seed of the perturbation)
    "rl": AdapterConfig(method="rlora", heads=3, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=1),
    "hy": AdapterConfig(method="hydralora", heads=2, rank=2, target_modules=["q_proj", "v_proj", "down_proj"], seed=2),
    "lo": AdapterConfig(method="lora", rank=8, target_modules=["q_proj", "o_proj", "up_proj"], seed=3),
    "rl2": AdapterConfig(method="rlora", heads=4, rank=3, target_modules="all-linear", seed=4),
    # R-LoRA with the zero router, saved in adapter format version 1 (see adapter_paths)
    "rl0": AdapterConfig(method="rlora", heads=2, rank=4, target_modules=["up_proj", "o_proj"], seed=5, router_init="zero"),
}
GREEDY = {"max_new_tokens": 12, "ignore_eos_token": True}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("inference")


@pytest.fixture(scope="module")
def model_dir(workdir):
    from rlora.tiny import build_tiny_model

    return build_tiny_model(workdir / "cache" / "tiny")


def fresh_base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def adapter_paths(workdir, model_dir):
    paths = perturbed_adapters(model_dir, ADAPTERS, workdir / "adapters", seed_offset=100)
    rewrite_as_format_v1(paths["rl0"])
    return paths


@pytest.fixture(scope="module")
def engine(workdir, model_dir, adapter_paths):
    engine = InferenceEngine(cache_dir=workdir / "cache", models_dir=workdir / "models", device="cpu")
    for adapter_id, path in adapter_paths.items():
        engine.adapter(adapter_id, path)
    yield engine
    engine.close()


def token_ids(result):
    return [t.id for t in result.tokens]


def prompt(text):
    return [BOS] + list(text.encode())


# ---------------------------------------------------------------------------------------------
# 1. Same function as training-time R-LoRA in eval mode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_id", list(ADAPTERS))
def test_engine_logits_equal_rlora_load_eval(engine, model_dir, adapter_paths, adapter_id):
    seq = prompt("The adapted forward pass, exactly.")
    reference = rlora.load(fresh_base(model_dir), adapter_paths[adapter_id]).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([seq])).logits[0]
        base = fresh_base(model_dir)(torch.tensor([seq])).logits[0]
    (got,) = engine.logits([seq], [adapter_id], base_model="tiny")
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_mixed_adapter_batch_logits_equal_each_adapter_alone(engine, model_dir, adapter_paths):
    seqs = [prompt("a mixed batch"), prompt("rows of different lengths, all padded left"), prompt("x"), prompt("plain base row"),
            prompt("rlora again"), prompt("a version 1 adapter: the mean-head correction")]
    ids = ["rl", "hy", "lo", None, "rl2", "rl0"]  # routed and unrouted corrections in one table
    got = engine.logits(seqs, ids, base_model="tiny")
    for seq, adapter_id, logits in zip(seqs, ids, got):
        model = fresh_base(model_dir) if adapter_id is None else rlora.load(fresh_base(model_dir), adapter_paths[adapter_id]).eval()
        with torch.no_grad():
            expected = model(torch.tensor([seq])).logits[0]
        # float32: the padded batch's matmuls sum in another order than one row's, which on some
        # CPUs' kernels moves a logit by a little more than 2e-5.
        torch.testing.assert_close(logits, expected, rtol=0, atol=5e-5)


def test_bfloat16_engine_reproduces_training_time_eval(workdir, model_dir, adapter_paths):
    """A bfloat16 base with float32 adapters, as training on CUDA saves and serving loads them:
    the engine rounds as RLoRALinear does, so the logits agree to bfloat16 accuracy."""
    seqs = [prompt("bfloat16 serving"), prompt("a second, longer row of the batch")]
    ids = ["rl", "hy"]
    with InferenceEngine(cache_dir=workdir / "cache", models_dir=workdir / "models", device="cpu", dtype=torch.bfloat16) as bf16:
        for adapter_id in ids:
            bf16.adapter(adapter_id, adapter_paths[adapter_id])
        got = bf16.logits(seqs, ids, base_model="tiny")
    for seq, adapter_id, logits in zip(seqs, ids, got):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        model = rlora.load(base, adapter_paths[adapter_id]).eval()
        with torch.no_grad():
            expected = model(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits.float(), expected.float(), rtol=0, atol=4e-3)


def test_bfloat16_engine_serves_a_version_1_adapter_beside_a_routed_correction(workdir, model_dir, adapter_paths):
    """The zero-router (format version 1) adapter in the same tables as one whose correction is
    routed (more correction heads): served in bfloat16 as training-time eval computes it."""
    seq = prompt("and a version 1 adapter")
    with InferenceEngine(cache_dir=workdir / "cache", models_dir=workdir / "models", device="cpu", dtype=torch.bfloat16) as bf16:
        for adapter_id in ("rl", "rl0"):
            bf16.adapter(adapter_id, adapter_paths[adapter_id])
        (got,) = bf16.logits([seq], ["rl0"], base_model="tiny")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = rlora.load(base, adapter_paths["rl0"]).eval()(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=4e-3)


def test_fingerprint_checked(engine, workdir, adapter_paths):
    import shutil

    bad = workdir / "adapters" / "bad"
    shutil.copytree(adapter_paths["rl"], bad)
    meta = json.loads((bad / "adapter_config.json").read_text())
    meta["base_model_fingerprint"] = "0" * 64
    (bad / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="made for base model"):
        engine.adapter("bad", bad)
    with pytest.raises(FileNotFoundError):
        engine.adapter("missing", workdir / "adapters" / "missing", base_model="tiny")


# ---------------------------------------------------------------------------------------------
# 2. Batching across adapters, continuous batching
# ---------------------------------------------------------------------------------------------


def test_mixed_adapter_batch_generates_what_each_request_generates_alone(engine):
    requests = [("rl", "Tenant one asks"), ("hy", "tenant two"), ("lo", "three: a longer prompt than the others"),
                (None, "the plain base model"), ("rl2", "all-linear"), ("rl", "same adapter, other prompt")]
    alone = []
    for adapter_id, text in requests:
        kwargs = {"adapter_id": adapter_id} if adapter_id else {"base_model": "tiny"}
        alone.append(token_ids(engine.generate(text, GREEDY, **kwargs)))
    runner = engine.base_model("tiny")
    handles = [
        engine.submit(text, GREEDY, **({"adapter_id": a} if a else {"base_model": "tiny"})) for a, text in requests
    ]
    batched = [token_ids(h.result(timeout=60)) for h in handles]
    assert batched == alone
    assert len({tuple(t) for t in alone}) == len(alone)  # the adapters really differ
    assert runner.max_rows >= 2


def test_continuous_batching_requests_join_and_leave(engine):
    long_params = {"max_new_tokens": 60, "ignore_eos_token": True}
    expected_long = token_ids(engine.generate("a long request", long_params, adapter_id="rl"))
    # Joining rows shorter and longer than the running batch's cache (which then gets padded
    # on the left, and trimmed again when the long row leaves).
    short = [("hy", "short one"), (None, "short base"), ("lo", "short three"),
             ("rl2", "a prompt much longer than the running request's cache, which is padded to fit it")]
    expected_short = [
        token_ids(engine.generate(text, {"max_new_tokens": 5, "ignore_eos_token": True}, **({"adapter_id": a} if a else {"base_model": "tiny"})))
        for a, text in short
    ]
    runner = engine.base_model("tiny")
    steps_before = runner.steps
    order = []
    long_handle = engine.submit("a long request", long_params, adapter_id="rl")
    long_handle._future.add_done_callback(lambda _: order.append("long"))
    events = long_handle.events(timeout=30)
    for _ in range(3):  # the long request is running ...
        next(events)
    short_handles = [
        engine.submit(text, {"max_new_tokens": 5, "ignore_eos_token": True}, **({"adapter_id": a} if a else {"base_model": "tiny"}))
        for a, text in short
    ]  # ... when the short ones join, mid-way
    for handle in short_handles:
        handle._future.add_done_callback(lambda _: order.append("short"))
    short_results = [h.result(timeout=30) for h in short_handles]
    assert [token_ids(r) for r in short_results] == expected_short
    assert token_ids(long_handle.result(timeout=60)) == expected_long
    assert order == ["short"] * len(short) + ["long"]  # the short ones finished (and left) while the long one ran on
    assert runner.steps - steps_before < 60 + len(short) * 5  # decode steps were shared


# ---------------------------------------------------------------------------------------------
# 3. Per-request parameters
# ---------------------------------------------------------------------------------------------


def test_stop_sequence_kept_in_text_and_ends_generation(engine):
    full = engine.generate("stop here", {"max_new_tokens": 20, "ignore_eos_token": True, "details": True}, adapter_id="rl")
    texts = [t.text for t in full.tokens]
    # A stop made of tokens 3..5's text (non-empty, as the byte-level model may emit partial chars).
    start = next(i for i in range(2, len(texts)) if texts[i])
    end = next(i for i in range(start + 1, len(texts)) if texts[i])
    stop = "".join(texts[start : end + 1])
    prefix = "".join(texts[:start])
    if stop in prefix:
        pytest.skip("stop text occurs earlier; pick is ambiguous for this model")
    result = engine.generate("stop here", {"max_new_tokens": 20, "ignore_eos_token": True, "stop": [stop, "never-there"], "details": True}, adapter_id="rl")
    assert result.finish_reason == "stop_sequence"
    assert result.generated_tokens == end + 1
    assert result.generated_text.endswith(stop)  # TGI keeps the stop text
    assert token_ids(result) == token_ids(full)[: end + 1]


def test_seed_reproducible_and_independent_of_batch(engine):
    sample = {"max_new_tokens": 16, "do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "ignore_eos_token": True, "details": True}
    first = engine.generate("sample me", {**sample, "seed": 7}, adapter_id="hy")
    second = engine.generate("sample me", {**sample, "seed": 7}, adapter_id="hy")
    assert token_ids(first) == token_ids(second) and first.seed == 7
    others = {tuple(token_ids(engine.generate("sample me", {**sample, "seed": s}, adapter_id="hy"))) for s in range(1, 5)}
    assert len(others) > 1  # sampling varies with the seed
    # In a batch with other requests (other adapters, greedy and sampled), the same seed gives the same tokens.
    handles = [engine.submit("other", {**sample, "seed": 3}, adapter_id="rl"),
               engine.submit("sample me", {**sample, "seed": 7}, adapter_id="hy"),
               engine.submit("greedy", GREEDY, adapter_id="lo")]
    assert token_ids(handles[1].result(timeout=30)) == token_ids(first)
    # Warpers that leave one candidate make sampling greedy.
    greedy = token_ids(engine.generate("sample me", {"max_new_tokens": 16, "ignore_eos_token": True}, adapter_id="hy"))
    assert token_ids(engine.generate("sample me", {**sample, "top_k": 1, "seed": 5}, adapter_id="hy")) == greedy
    assert token_ids(engine.generate("sample me", {**sample, "top_k": None, "temperature": 1.0, "top_p": 1e-6, "seed": 5}, adapter_id="hy")) == greedy
    drawn = engine.generate("sample me", {"do_sample": True, "max_new_tokens": 2, "details": True}, adapter_id="hy")
    assert drawn.seed is not None  # a seed is drawn and reported when none is given
    assert engine.generate("x", {"max_new_tokens": 2}, adapter_id="hy").seed is None  # greedy: no seed


def test_repetition_penalty_and_logprobs(engine):
    plain = engine.generate("repeat repeat", {"max_new_tokens": 20, "ignore_eos_token": True, "details": True}, adapter_id="lo")
    penalised = engine.generate("repeat repeat", {"max_new_tokens": 20, "ignore_eos_token": True, "repetition_penalty": 5.0}, adapter_id="lo")
    assert token_ids(plain) != token_ids(penalised)
    assert len(set(token_ids(penalised))) > len(set(token_ids(plain)))
    assert all(t.logprob is not None and t.logprob <= 0 for t in plain.tokens)


def test_details_prefill_full_text_and_truncate(engine, model_dir, adapter_paths):
    result = engine.generate("Hello", {"max_new_tokens": 3, "details": True, "decoder_input_details": True, "return_full_text": True}, adapter_id="rl")
    assert result.prompt_tokens == 6 and result.generated_tokens == 3
    assert [t.id for t in result.prefill] == prompt("Hello")
    assert result.prefill[0].logprob is None and result.prefill[0].special
    assert result.generated_text.startswith("Hello")
    # Prefill logprobs are those of the adapted model.
    reference = rlora.load(fresh_base(model_dir), adapter_paths["rl"]).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([prompt("Hello")])).logits[0], -1)
    expected = [float(logprobs[i, t]) for i, t in enumerate(prompt("Hello")[1:])]
    assert [t.logprob for t in result.prefill[1:]] == pytest.approx(expected, abs=1e-4)
    # truncate keeps bos and the last tokens.
    truncated = engine.generate("0123456789", {"max_new_tokens": 2, "truncate": 4, "decoder_input_details": True, "details": True}, adapter_id="rl")
    assert [t.id for t in truncated.prefill] == [BOS] + list(b"789")


def test_finish_reasons_length_and_eos(engine, workdir, model_dir, adapter_paths):
    length = engine.generate("count", {"max_new_tokens": 4, "details": True}, adapter_id="rl")
    assert (length.finish_reason, length.generated_tokens) == ("length", 4)
    # A copy of the tiny model whose eos logit beats the token it would emit at step 3: that step
    # then ends in eos (the logits of earlier steps do not change).
    normal = engine.generate("count", {"max_new_tokens": 8, "ignore_eos_token": True}, base_model="tiny")
    target = token_ids(normal)[3]
    assert target not in token_ids(normal)[:3] and EOS not in token_ids(normal)[:4]
    model = fresh_base(model_dir)
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[target] * 1.001
    model.save_pretrained(workdir / "models" / "tiny-eos")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(workdir / "models" / "tiny-eos")
    eos = engine.generate("count", {"max_new_tokens": 8, "details": True}, base_model="tiny-eos")
    assert eos.finish_reason == "eos_token" and token_ids(eos) == token_ids(normal)[:3] + [EOS]
    assert eos.tokens[-1].id == EOS and eos.tokens[-1].special and eos.tokens[-1].text == "<|eos|>"
    assert "<|eos|>" not in eos.generated_text
    ignored = engine.generate("count", {"max_new_tokens": 8, "ignore_eos_token": True}, base_model="tiny-eos")
    assert ignored.finish_reason == "length" and ignored.generated_tokens == 8
    # Adapters of "tiny" load on "tiny-eos" too (same architecture fingerprint).
    assert engine.generate("count", {"max_new_tokens": 2}, adapter_id="rl-on-eos", adapter_path=adapter_paths["rl"], base_model="tiny-eos").generated_tokens == 2


# ---------------------------------------------------------------------------------------------
# Limits and validation
# ---------------------------------------------------------------------------------------------


def test_limits_and_bad_parameters_raise_validation_errors(workdir, model_dir):
    limits = Limits(max_input_tokens=16, max_total_tokens=24, max_new_tokens=20)
    with InferenceEngine(cache_dir=workdir / "cache", device="cpu", limits=limits) as small:
        def field_of(text, **params):
            with pytest.raises(GenerationValidationError) as info:
                small.submit(text, params, base_model="tiny")
            assert isinstance(info.value, ValueError)
            return info.value.field

        assert field_of("x" * 40) == "inputs"
        assert field_of("x", max_new_tokens=21) == "max_new_tokens"
        assert field_of("x" * 10, max_new_tokens=20) == "max_new_tokens"  # 11 + 20 > 24
        assert field_of("x", max_new_tokens=0) == "max_new_tokens"
        assert field_of("x", temperature=0.0) == "temperature"
        assert field_of("x", top_p=1.5) == "top_p"
        assert field_of("x", top_k=-1) == "top_k"
        assert field_of("x", stop=["a", "b", "c", "d", "e"]) == "stop"
        assert field_of("x", truncate=17) == "truncate"
        assert field_of("x", seed=-1) == "seed"
        assert field_of("x", bogus=1) == "parameters"
        # Python callers hand plain dicts: wrong types are this request's error, found up front.
        assert field_of("x", temperature="hot") == "temperature"
        assert field_of("x", top_k=True) == "top_k"
        assert field_of("x", do_sample="yes") == "do_sample"
        assert field_of("x", stop=[b"ab"]) == "stop"
        assert field_of("x", stop=5) == "stop"
        # truncate makes a long prompt fit; the default max_new_tokens is capped by the total.
        result = small.generate("x" * 40, {"truncate": 16, "details": True}, base_model="tiny")
        assert result.prompt_tokens == 16 and result.generated_tokens <= 24 - 16
    with InferenceEngine(cache_dir=workdir / "cache", device="cpu", limits=Limits(max_queue=0)) as full:
        with pytest.raises(EngineOverloaded):
            full.submit("x", {"max_new_tokens": 1}, base_model="tiny")


# ---------------------------------------------------------------------------------------------
# Adapter cache
# ---------------------------------------------------------------------------------------------


def test_lru_eviction_under_byte_bound_and_explicit_evict(workdir, adapter_paths):
    with InferenceEngine(cache_dir=workdir / "cache", device="cpu", adapter_cache_bytes=1 << 30) as probe:
        sizes = {a: probe.adapter(a, p).nbytes for a, p in adapter_paths.items()}
    bound = sizes["rl"] + max(sizes["hy"], sizes["lo"])  # room for two of rl, hy, lo; not three
    with InferenceEngine(cache_dir=workdir / "cache", device="cpu", adapter_cache_bytes=bound) as small:
        small.adapter("rl", adapter_paths["rl"])
        small.adapter("hy", adapter_paths["hy"])
        assert small.adapters.ids() == ["rl", "hy"]
        small.generate("touch rl", {"max_new_tokens": 1}, adapter_id="rl")  # rl is now the most recent
        small.adapter("lo", adapter_paths["lo"])  # evicts the least recently used: hy
        assert small.adapters.ids() == ["rl", "lo"]
        assert small.adapters.nbytes == sizes["rl"] + sizes["lo"] <= bound
        with pytest.raises(KeyError):
            small.submit("x", {"max_new_tokens": 1}, adapter_id="hy")  # gone, and no path given
        # A running request keeps its adapter when it is evicted (deleted adapter).
        handle = small.submit("running", {"max_new_tokens": 30, "ignore_eos_token": True}, adapter_id="rl")
        assert small.evict("rl") and not small.evict("rl")
        assert "rl" not in small.adapters.ids()
        assert handle.result(timeout=30).generated_tokens == 30
        # Reloading from the path works again after eviction.
        assert small.generate("again", {"max_new_tokens": 1}, adapter_id="rl", adapter_path=adapter_paths["rl"]).generated_tokens == 1


# ---------------------------------------------------------------------------------------------
# 6. Routing summary
# ---------------------------------------------------------------------------------------------


def test_routing_summary_with_details_matches_diagnostics(engine, model_dir, adapter_paths):
    params = {"max_new_tokens": 6, "ignore_eos_token": True, "details": True}
    # In a batch with other adapters and padding, so per-row bookkeeping is exercised.
    handles = [engine.submit("a much longer prompt for padding", params, adapter_id="hy"),
               engine.submit("route me", params, adapter_id="rl"),
               engine.submit("route me", params, adapter_id="lo")]
    hy, rl, lo = [h.result(timeout=30) for h in handles]
    assert lo.routing is None  # lora has no router
    assert engine.generate("route me", {"max_new_tokens": 2}, adapter_id="rl").routing is None  # no details
    summary = rl.routing
    assert set(summary["per_layer"]) == {f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")}
    # The request's tokens: the prompt and every generated token but the last, which was never fed back.
    seq = prompt("route me") + token_ids(rl)[:-1]
    model = rlora.load(fresh_base(model_dir), adapter_paths["rl"]).eval()
    expected = routing_summary(model, [{"input_ids": torch.tensor([seq])}])
    for name, layer in expected["per_layer"].items():
        got = summary["per_layer"][name]
        assert got["tokens"] == len(seq)
        assert got["mean_weight"] == pytest.approx(layer["mean_weight"], abs=1e-5)
        assert got["entropy"] == pytest.approx(layer["entropy"], abs=1e-5)
        assert sum(got["mean_weight"]) == pytest.approx(1.0, abs=1e-5)
    assert len(hy.routing["per_layer"]) == 6 and all(len(v["mean_weight"]) == 2 for v in hy.routing["per_layer"].values())


# ---------------------------------------------------------------------------------------------
# Async API, streaming, cancellation
# ---------------------------------------------------------------------------------------------


def test_async_stream_adds_up_and_cancel_frees_the_row(engine):
    async def scenario():
        handle = await engine.asubmit("stream me", {"max_new_tokens": 10, "ignore_eos_token": True, "details": True}, adapter_id="rl")
        events = [event async for event in handle.stream()]
        final = events[-1]
        assert final.final and all(not e.final for e in events[:-1]) and len(events) == 10
        assert final.generated_text == final.result.generated_text
        assert "".join(e.token.text for e in events if not e.token.special) == final.generated_text
        assert final.result.finish_reason == "length"
        result = await engine.agenerate("stream me", {"max_new_tokens": 10, "ignore_eos_token": True}, adapter_id="rl")
        assert result.generated_text == final.generated_text

        # A client that goes away: leaving the stream early cancels the request.
        handle = await engine.asubmit("cancel me", {"max_new_tokens": 500, "ignore_eos_token": True}, adapter_id="hy")
        async for event in handle.stream():
            if event.index >= 2:
                break
        with pytest.raises(RequestCancelled):
            await handle.aresult()

        # A task awaiting the result that is cancelled (a disconnect in a non-streaming route).
        handle = await engine.asubmit("cancel me too", {"max_new_tokens": 500, "ignore_eos_token": True}, adapter_id="lo")
        task = asyncio.ensure_future(handle.aresult())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert handle.cancelled
        with pytest.raises(RequestCancelled):
            handle.result(timeout=10)

    asyncio.run(scenario())
    runner = engine.base_model("tiny")
    deadline = time.monotonic() + 10
    while runner.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.running == 0  # cancelled rows left the batch long before 500 tokens


def test_submit_from_many_threads(engine):
    results = {}

    def worker(i):
        results[i] = token_ids(engine.generate(f"thread {i}", GREEDY, adapter_id=["rl", "hy", "lo", "rl2"][i % 4]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    assert results[0] == token_ids(engine.generate("thread 0", GREEDY, adapter_id="rl"))
