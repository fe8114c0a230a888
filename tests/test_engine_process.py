"""Generation forwarded to `rlora engine` processes: real engine subprocesses on the tiny model
(CPU), the API with RLORA_ENGINE_URLS pointing at them, compared with the embedded default
(an engine in the API process) on the same database and adapters.

Engine A holds ``tiny``; engine B holds ``other`` and ``tiny`` (``other`` is a second copy of
the tiny model under RLORA_MODELS_DIR), for routing. Both need the token. The tests of
test_service_generate that do not look inside the in-process engine run here too, against the
API forwarding to engine A.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import pytest
from conftest_service import (
    REPO, database_url, free_port, make_settings, rlora_command, served_in_thread, service_env, stop_process, wait_for,
    wait_until_answering,
)
from fastapi.testclient import TestClient
from test_service_generate import (  # noqa: F401 - fixtures, and tests run here against the forwarding API
    MAX_NEW_TOKENS,
    PROMPT,
    app,
    body,
    client,
    error_of,
    make_adapter,
    new_tenant,
    owner,
    sse_events,
    test_another_tenants_adapter_is_404,
    test_bad_inputs_are_422,
    test_bad_parameters_are_422_naming_the_field,
    test_compat_route_both_modes,
    test_full_tgi_and_lorax_client_bodies_with_defaults_are_accepted,
    test_generate_details,
    test_generate_routes_need_a_key,
    test_missing_adapter_files_are_410,
    test_null_parameters_and_stream_mean_defaults,
    test_return_full_text,
    test_seed_reproducibility,
    test_stop_sequence,
    test_stream_tokens_add_up_to_the_final_text,
)

from rlora.adapter.folder import AdapterMismatchError
from rlora.basemodels import UnknownBaseModel
from rlora.serve import (
    AdapterTooLarge,
    EngineClosed,
    EngineOverloaded,
    GenerationParams,
    GenerationValidationError,
    RequestCancelled,
)
from service.api.app import create_app
from service.api.inference import current_engine
from service.engine.client import EngineUnavailable, RemoteEngine
from service.engine.local import make_engine
from service.engine.protocol import TOKEN_HEADER, RemoteEngineError, error_from_json, error_json
from service.engine.server import create_engine_app

TOKEN = "engine-secret"
GREEDY = {"max_new_tokens": 12, "ignore_eos_token": True}
LONG = {"max_new_tokens": MAX_NEW_TOKENS, "ignore_eos_token": True}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def engine_process(home, models_dir, log_path, *base_models: str):
    """``rlora engine`` on a free port holding ``base_models``: (its URL, the process)."""
    port = free_port()
    env = service_env(
        home=home, models_dir=models_dir, inference_device="cpu", max_new_tokens=MAX_NEW_TOKENS, engine_token=TOKEN,
    )
    env["OMP_NUM_THREADS"] = "1"  # as this process: the same numbers, and no fight over 2 cores
    arguments = [arg for name in base_models for arg in ("--base-model", name)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            rlora_command("engine", "--port", str(port), *arguments), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    return f"http://127.0.0.1:{port}", process


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-home")


@pytest.fixture(scope="module")
def models_dir(home, tiny_model_path):
    for name in ("other", "third"):
        shutil.copytree(tiny_model_path, home / "models-dir" / name)
    return home / "models-dir"


@pytest.fixture(scope="module")
def engines(home, models_dir):
    """Engines A (tiny) and B (other, tiny), started together: their URLs."""
    started = [
        (*engine_process(home, models_dir, home / "engine-a.log", "tiny"), home / "engine-a.log"),
        (*engine_process(home, models_dir, home / "engine-b.log", "other", "tiny"), home / "engine-b.log"),
    ]
    try:
        for url, process, log_path in started:
            wait_until_answering(f"{url}/health", process, log_path, timeout=90)
        yield [url for url, _, _ in started]
    finally:
        for _, process, _ in started:
            stop_process(process)


@pytest.fixture(scope="module")
def settings(home, models_dir, engines):
    """The API's settings, forwarding to engine A (the fixtures app and client use them)."""
    with database_url("sqlite", home) as url:
        yield make_settings(
            home, url, max_new_tokens=MAX_NEW_TOKENS, inference_device="cpu", models_dir=models_dir,
            engine_urls=engines[0], engine_token=TOKEN,
        )


def forwarding_to(settings, urls: str, **changes):
    return settings.model_copy(update={"engine_urls": urls, **changes})


@pytest.fixture(scope="module")
def embedded(settings):
    """The same API with its engine in-process (the embedded default): the reference."""
    app = create_app(forwarding_to(settings, None))
    with TestClient(app) as test_client:
        yield test_client


def engine_info(url: str) -> dict:
    response = httpx.get(f"{url}/info", headers={TOKEN_HEADER: TOKEN}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def runner_stats(url: str, base_model: str = "tiny") -> dict:
    return engine_info(url)["stats"]["base_models"].get(base_model, {"running": 0, "pending": 0, "steps": 0})


def idle(url: str) -> bool:
    stats = runner_stats(url)
    return stats["running"] == 0 and stats["pending"] == 0


# --- the same answers as the in-process engine -------------------------------------------------


def test_forwarding_makes_no_engine_in_the_api_process(client, app, owner):
    headers, adapter_id = owner
    assert client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)).status_code == 200
    assert isinstance(current_engine(app), RemoteEngine)


def test_the_engine_process_reports_its_generations_at_metrics(client, engines, owner):
    """Each engine serves its own /metrics (no token: counts and timings only); the forwarding
    API process, holding no engine, reports no cache or model of its own."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(url: str) -> dict:
        response = httpx.get(f"{url}/metrics", timeout=10)
        assert response.status_code == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(response.text) for s in f.samples}

    headers, adapter_id = owner
    before = scrape(engines[0])
    assert client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)).status_code == 200
    after = scrape(engines[0])
    tiny = (("base_model", "tiny"),)
    assert after[("rlora_generated_tokens_total", tiny)] == before.get(("rlora_generated_tokens_total", tiny), 0) + GREEDY["max_new_tokens"]
    ttft = ("rlora_generation_time_to_first_token_seconds_count", tiny)
    assert after[ttft] == before.get(ttft, 0) + 1
    lookups = after[("rlora_adapter_cache_hits_total", ())] + after[("rlora_adapter_cache_misses_total", ())]
    assert lookups == before[("rlora_adapter_cache_hits_total", ())] + before[("rlora_adapter_cache_misses_total", ())] + 1
    assert after[("rlora_base_models_loaded", ())] >= 1 and after[("rlora_adapter_cache_adapters", ())] >= 1
    api = client.get("/metrics").text
    assert "rlora_http_requests_total" in api and "rlora_adapter_cache_hits" not in api


def test_generate_equals_the_in_process_engine(client, embedded, owner):
    headers, adapter_id = owner
    requests = [
        body(None, **GREEDY, details=True, decoder_input_details=True),
        body(adapter_id, **GREEDY, details=True, decoder_input_details=True),
        body(adapter_id, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=50, seed=7, details=True),
        body(adapter_id, max_new_tokens=30, stop=["a"], return_full_text=True),
    ]
    for request in requests:
        for path in ("/generate", "/"):
            remote, local = client.post(path, headers=headers, json=request), embedded.post(path, headers=headers, json=request)
            assert remote.status_code == local.status_code == 200, remote.text
            assert remote.json() == local.json()  # every token, logprob, the seed, prefill and routing
            assert remote.headers["x-generated-tokens"] == local.headers["x-generated-tokens"]
    details = client.post("/generate", headers=headers, json=requests[1]).json()["details"]
    assert details["generated_tokens"] == 12 and len(details["prefill"]) > 1 and details["routing"]


def test_stream_events_equal_the_in_process_engine(client, embedded, owner):
    headers, adapter_id = owner
    for request in (body(adapter_id, **GREEDY, details=True), body(None, max_new_tokens=8, do_sample=True, seed=3)):
        remote = client.post("/generate_stream", headers=headers, json=request)
        local = embedded.post("/generate_stream", headers=headers, json=request)
        assert remote.status_code == 200 and remote.headers["content-type"].startswith("text/event-stream")
        assert sse_events(remote.text) == sse_events(local.text)
    events = sse_events(client.post("/generate_stream", headers=headers, json=body(adapter_id, **GREEDY, details=True)).text)
    assert [e["index"] for e in events] == list(range(1, 13)) and events[-1]["details"]["routing"]


def test_openai_routes_forward_as_generate_does(client, embedded, owner):
    # The chat template is rendered in the API process (the base model's tokenizer, no weights);
    # the engine process generates, as for /generate.
    headers, adapter_id = owner
    chat = {"model": adapter_id, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "seed": 3, "logprobs": True}
    completion = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0}
    for path, request in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        remote, local = client.post(path, headers=headers, json=request), embedded.post(path, headers=headers, json=request)
        assert remote.status_code == local.status_code == 200, remote.text
        strip = lambda body: {key: value for key, value in body.items() if key not in ("id", "created")}  # noqa: E731
        assert strip(remote.json()) == strip(local.json())
        streamed = client.post(path, headers=headers, json={**request, "stream": True})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")


# --- refusals travel as the engine's own errors ------------------------------------------------


REFUSED = [
    (body(None, max_new_tokens=MAX_NEW_TOKENS + 1), 422, "parameters.max_new_tokens"),
    (body(None, inputs="x" * 1100, max_new_tokens=4), 422, "inputs"),  # the tiny model's context is 1024
    (body(None, stop=["a", "b", "c", "d", "e"]), 422, "parameters.stop"),
]


@pytest.mark.parametrize("request_body, status, field", REFUSED, ids=[f for _, _, f in REFUSED])
def test_a_refused_request_is_the_same_error(client, embedded, owner, request_body, status, field):
    headers, _ = owner
    for path in ("/generate", "/generate_stream", "/"):
        remote = client.post(path, headers=headers, json=request_body)
        assert error_of(remote, status)["field"] == field
        assert remote.json() == embedded.post(path, headers=headers, json=request_body).json()


def test_an_unknown_base_model_is_404(settings, engines, owner):
    headers, _ = owner
    errors = []
    for forwarding in (engines[0], None):
        with TestClient(create_app(forwarding_to(settings, forwarding, default_base_model="nope"))) as client:
            errors.append(error_of(client.post("/generate", headers=headers, json=body(None, **GREEDY)), 404))
    assert errors[0] == errors[1] and errors[0]["message"].startswith("unknown base model 'nope'; available: ")


@pytest.mark.parametrize("error", [
    GenerationValidationError("top_k", "`top_k` must be strictly positive"),
    AdapterMismatchError("adapter 'ad-1' is for base model 'a', not 'b'"),
    AdapterTooLarge("adapter ad-1 needs 9 bytes, the cache holds 8"),
    FileNotFoundError(2, "No such file or directory", "/x/adapter_config.json"),
    UnknownBaseModel("nope", ["tiny"]),
    EngineOverloaded("too many requests waiting"),
    EngineClosed("the inference engine is shut down"),
    RequestCancelled("cancelled"),
], ids=lambda error: type(error).__name__)
def test_errors_are_made_again_as_their_own_class(error):
    again = error_from_json(json.loads(json.dumps(error_json(error))))
    assert type(again) is type(error) and str(again) == str(error)
    assert getattr(again, "field", None) == getattr(error, "field", None)


def test_an_error_of_no_known_class_is_a_remote_engine_error():
    again = error_from_json(error_json(ZeroDivisionError("division by zero")))
    assert isinstance(again, RemoteEngineError) and str(again) == "ZeroDivisionError: division by zero"


# --- adapters ----------------------------------------------------------------------------------


def test_a_deleted_adapter_is_evicted_from_the_engine(client, app, engines, tiny_model_path):
    tenant_id, headers = new_tenant(app, "deleter")
    adapter_id = make_adapter(app, tiny_model_path, tenant_id, seed=5)
    assert client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)).status_code == 200
    cached = engine_info(engines[0])["stats"]["adapters"]
    assert client.delete(f"/v1/adapters/{adapter_id}", headers=headers).status_code == 200
    assert engine_info(engines[0])["stats"]["adapters"] == cached - 1
    assert error_of(client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)), 404)["code"] == "not_found"


# --- client disconnects (a real API server: the test client does not stream) --------------------


@pytest.fixture(scope="module")
def live(settings):
    """The forwarding API in a uvicorn server in a thread: its base URL."""
    with served_in_thread(create_app(settings)) as url:
        yield url


def test_a_stream_its_client_closes_is_cancelled_on_the_engine(live, engines, owner):
    headers, adapter_id = owner
    wait_for(lambda: idle(engines[0]), timeout=10, message="an idle engine")
    steps = runner_stats(engines[0])["steps"]
    with httpx.Client(base_url=live, timeout=30) as http:
        with http.stream("POST", "/generate_stream", headers=headers, json=body(adapter_id, **LONG)) as response:
            assert response.status_code == 200
            events = (json.loads(line[6:]) for line in response.iter_lines() if line)
            assert [next(events)["index"] for _ in range(3)] == [1, 2, 3]
            assert runner_stats(engines[0])["running"] == 1
        # leaving the block closes the connection
    wait_for(lambda: idle(engines[0]), timeout=5, message="the engine to cancel the request")
    assert runner_stats(engines[0])["steps"] - steps < MAX_NEW_TOKENS // 2  # stopped, not run to the end


def test_a_generate_client_leaving_cancels_the_request_on_the_engine(live, engines, owner):
    headers, adapter_id = owner
    wait_for(lambda: idle(engines[0]), timeout=10, message="an idle engine")
    steps = runner_stats(engines[0])["steps"]
    # Gone after 0.2 s: far fewer steps than the request asks for, even on a fast machine.
    with httpx.Client(base_url=live, timeout=httpx.Timeout(30, read=0.2)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/generate", headers=headers, json=body(adapter_id, **LONG))
    wait_for(lambda: idle(engines[0]), timeout=5, message="the engine to cancel the request")
    assert runner_stats(engines[0])["steps"] - steps < MAX_NEW_TOKENS // 2
    with httpx.Client(base_url=live, timeout=30) as http:  # and the API forwards the next one
        assert http.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)).headers["x-generated-tokens"] == "12"


# --- engines down, tokens ----------------------------------------------------------------------


def test_no_reachable_engine_is_a_prompt_503_naming_it(settings, owner):
    headers, adapter_id = owner
    dead = f"http://127.0.0.1:{free_port()}"
    with TestClient(create_app(forwarding_to(settings, dead))) as client:
        for path in ("/generate", "/generate_stream", "/"):
            started = time.monotonic()
            error = error_of(client.post(path, headers=headers, json=body(adapter_id, **GREEDY)), 503)
            assert time.monotonic() - started < 10
            assert error["code"] == "engine_unavailable" and dead in error["message"], error


def test_a_down_engine_is_passed_over_for_the_next(settings, engines, owner):
    headers, adapter_id = owner
    dead = f"http://127.0.0.1:{free_port()}"
    with TestClient(create_app(forwarding_to(settings, f"{dead},{engines[0]}"))) as client:
        for _ in range(2):
            response = client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY))
            assert response.status_code == 200 and response.headers["x-generated-tokens"] == "12"


def test_the_engine_needs_the_token(settings, engines, owner):
    headers, adapter_id = owner
    assert httpx.get(f"{engines[0]}/health").status_code == 200  # liveness needs none
    for route in ("/info", "/adapters/ad-x"):
        assert httpx.request("GET" if route == "/info" else "DELETE", f"{engines[0]}{route}").status_code == 401
    assert httpx.post(f"{engines[0]}/generate", json={"inputs": "hi"}, headers={TOKEN_HEADER: "wrong"}).status_code == 401
    with TestClient(create_app(forwarding_to(settings, engines[0], engine_token="wrong"))) as client:
        error = error_of(client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)), 503)
        assert "RLORA_ENGINE_TOKEN" in error["message"]


# --- routing by base model ---------------------------------------------------------------------


def test_requests_go_to_the_engines_that_hold_their_base_model(engines):
    a, b = engines

    async def run() -> None:
        remote = RemoteEngine(engines, default_base_model="tiny", token=TOKEN)
        params = GenerationParams(max_new_tokens=4, ignore_eos_token=True)
        try:
            # only B holds "other"
            before = runner_stats(b, "other")["steps"]
            await (await remote.asubmit("hi", params, base_model="other")).aresult()
            assert runner_stats(b, "other")["steps"] > before and "other" not in engine_info(a)["base_models"]

            # both hold tiny: the least loaded first (A, then B while A runs a long request)
            wait_for(lambda: idle(a) and idle(b), timeout=10, message="idle engines")
            long = await remote.asubmit("hi", GenerationParams(**LONG))
            assert remote.engines[0].in_flight == 1
            steps_b = runner_stats(b)["steps"]
            await (await remote.asubmit("hi", params)).aresult()  # the default base model, tiny
            assert runner_stats(b)["steps"] > steps_b and runner_stats(a)["running"] == 1
            long.cancel()

            # none holds "third": one engine loads it, and keeps the requests for it
            await (await remote.asubmit("hi", params, base_model="third")).aresult()
            holders = [url for url in engines if "third" in engine_info(url)["base_models"]]
            assert len(holders) == 1
            await remote.refresh()
            await (await remote.asubmit("hi", params, base_model="third")).aresult()
            assert [url for url in engines if "third" in engine_info(url)["base_models"]] == holders
        finally:
            await remote.aclose()

    asyncio.run(run())
    wait_for(lambda: idle(a), timeout=5, message="the long request to be cancelled")


# --- an engine shutting down under a request ---------------------------------------------------


def test_an_error_after_the_stream_began_is_raised_from_the_stream(settings):
    """An engine server in a thread of this process, its engine closed while a request streams."""
    engine = make_engine(settings)

    async def run(url: str) -> None:
        remote = RemoteEngine([url], default_base_model="tiny")
        try:
            handle = await remote.asubmit("hi", GenerationParams(**LONG))
            events = handle.stream()
            assert [(await anext(events)).index for _ in range(2)] == [1, 2]
            await asyncio.to_thread(engine.close)
            with pytest.raises(EngineClosed, match="shut down"):
                async for _ in events:
                    pass
            with pytest.raises(EngineUnavailable, match="shut down"):  # and it takes no more
                await remote.asubmit("hi", GenerationParams(**GREEDY))
        finally:
            await remote.aclose()

    with served_in_thread(create_engine_app(engine)) as url:
        asyncio.run(run(url))


def test_the_engines_events_carry_the_api_requests_id(settings, caplog, monkeypatch):
    """The API's request id goes with a forwarded request (X-Request-ID), so that the engine's
    events about it, here a failure after its stream began, name it and its tenant."""
    from service.logs import log_context

    engine = make_engine(settings)
    runner = engine.base_model("tiny")

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner, "_decode_step", broken_step)  # the prefill's token goes out, then this

    async def run(url: str) -> None:
        remote = RemoteEngine([url], default_base_model="tiny")
        try:
            with log_context(request_id="api-req-7"):
                handle = await remote.asubmit("hi", GenerationParams(**LONG), tenant="tn-seven")
            with pytest.raises(RemoteEngineError):
                async for _ in handle.stream():
                    pass
        finally:
            await remote.aclose()

    with served_in_thread(create_engine_app(engine)) as url:
        asyncio.run(run(url))
    (failed,) = [r for r in caplog.records if r.getMessage() == "generation failed after its stream began"]
    assert failed.request_id == "api-req-7" and failed.tenant_id == "tn-seven"
