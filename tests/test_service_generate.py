"""/generate, /generate_stream and / (TGI's wire format) over the service, on the tiny model.

Adapters are made without a training job: `rlora.attach` on the tiny model, weights perturbed,
`rlora.save` under the service's jobs folder and a row inserted through the ORM, as the worker
would. SQLite throughout, plus one PostgreSQL round trip.
"""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest
import torch
from conftest_service import database_url, fresh_postgres_database, make_settings, served_in_thread, wait_for
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

import rlora
from rlora import AdapterConfig
from rlora.serve import GenerationParams, GenerationValidationError
from service.api.app import create_app
from service.api.auth import create_tenant
from service.api.inference import current_engine, get_engine
from service.api.tgi import GenerateParameters, generate_response, stream_event
from service.models import Adapter, Job

MAX_NEW_TOKENS = 300  # the server's limit (RLORA_MAX_NEW_TOKENS) in these tests
PROMPT = "Hello, adapter."
GREEDY = {"max_new_tokens": 12, "ignore_eos_token": True}
RLORA = AdapterConfig(method="rlora", heads=3, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"], seed=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    home = tmp_path_factory.mktemp("generate-home")
    with database_url("sqlite", home) as url:
        yield make_settings(home, url, max_new_tokens=MAX_NEW_TOKENS, adapter_cache_bytes=64 << 20, inference_device="cpu")


@pytest.fixture(scope="module")
def app(settings):
    return create_app(settings)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


def new_tenant(app, label="gen") -> tuple[str, dict[str, str]]:
    with app.state.db.session() as session:
        tenant, key = create_tenant(session, f"{label}-{secrets.token_hex(4)}")
        return tenant.id, {"Authorization": f"Bearer {key}"}


def make_adapter(app, tiny_model_path, tenant_id: str, config: AdapterConfig = RLORA, seed: int = 0) -> str:
    """An adapter of ``tenant_id`` as a finished job leaves it: folder under the jobs dir, and a row."""
    model = rlora.attach(AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), config)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # away from the start, so the adapter changes the output
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    with app.state.db.session() as session:
        job = Job(
            tenant_id=tenant_id, status="succeeded", base_model="tiny", mixture=[], adapter=config.to_dict(),
            training={}, queue="rlora.cpu", request_hash="0" * 64,
        )
        session.add(job)
        session.flush()
        path = rlora.save(model, app.state.settings.jobs_dir / job.id / "adapter", base_model_name="tiny")
        config_json = json.loads((path / "adapter_config.json").read_text())
        adapter = Adapter(tenant_id=tenant_id, job_id=job.id, base_model="tiny", config=config_json, path=str(path), metrics={})
        session.add(adapter)
        session.commit()
        return adapter.id


@pytest.fixture(scope="module")
def owner(app, client, tiny_model_path):
    """A tenant with one R-LoRA adapter: (headers, adapter id)."""
    tenant_id, headers = new_tenant(app, "owner")
    return headers, make_adapter(app, tiny_model_path, tenant_id)


def error_of(response, status: int) -> dict:
    """The error of a TGI route, checked to be in TGI's shape (``{"error": message,
    "error_type"}``, plus the service's code and field): as ``{"message", "error_type", "code",
    "field"}``."""
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) <= {"error", "error_type", "code", "field"} and isinstance(error["error"], str) and error["error"], error
    assert error["error_type"] and error["code"], error
    return {"message": error["error"], "error_type": error["error_type"], "code": error["code"], "field": error.get("field")}


def sse_events(text: str) -> list[dict]:
    blocks = [block for block in text.split("\n\n") if block.strip()]
    assert all(block.startswith("data: ") for block in blocks), text[:200]
    return [json.loads(block[len("data: ") :]) for block in blocks]


def body(adapter_id=None, inputs=PROMPT, **parameters) -> dict:
    return {"inputs": inputs, "parameters": {"adapter_id": adapter_id, **parameters}}


# --- /generate ---------------------------------------------------------------------------------


def test_api_starts_without_an_engine_and_closes_it_at_shutdown(settings, tiny_model_path):
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert current_engine(app) is None  # nothing loaded at startup
        _, headers = new_tenant(app)
        response = client.post("/generate", headers=headers, json=body(**GREEDY))
        assert response.status_code == 200, response.text
        engine = current_engine(app)
        assert engine is not None and engine.loaded_base_models() == ["tiny"]
        assert engine.adapters.max_bytes == settings.adapter_cache_bytes and engine.limits.max_new_tokens == MAX_NEW_TOKENS
        runner = engine.base_model("tiny")
    assert current_engine(app) is None and not runner._thread.is_alive()


def test_generate_greedy_equals_the_engine_and_the_adapter_matters(client, app, owner):
    headers, adapter_id = owner
    response = client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY))
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"generated_text"}  # no details unless asked for, as TGI

    engine = get_engine(app)
    with app.state.db.session() as session:
        row = session.get(Adapter, adapter_id)
    direct = engine.generate(PROMPT, GenerationParams(**GREEDY), adapter_id=adapter_id, adapter_path=row.path, base_model="tiny")
    assert response.json()["generated_text"] == direct.generated_text
    assert response.headers["x-generated-tokens"] == "12"

    base = client.post("/generate", headers=headers, json=body(None, **GREEDY, details=True)).json()
    base_direct = engine.generate(PROMPT, GenerationParams(**GREEDY, details=True), base_model="tiny")
    assert [t["id"] for t in base["details"]["tokens"]] == [t.id for t in base_direct.tokens]
    assert [t["id"] for t in base["details"]["tokens"]] != [t.id for t in direct.tokens]
    assert base["details"]["routing"] is None  # no adapter, no router


def test_generate_details(client, owner):
    headers, adapter_id = owner
    response = client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY, details=True, decoder_input_details=True))
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 12 and details["seed"] is None
    n_prompt = len(PROMPT.encode()) + 1  # bytes, plus bos
    assert details["prompt_tokens"] == n_prompt and len(details["prefill"]) == n_prompt
    assert details["prefill"][0]["logprob"] is None and all(t["logprob"] <= 0 for t in details["prefill"][1:])
    assert len(details["tokens"]) == 12
    for token in details["tokens"]:
        assert set(token) == {"id", "text", "logprob", "special"}
        assert isinstance(token["id"], int) and isinstance(token["text"], str) and token["logprob"] <= 0
    text = "".join(t["text"] for t in details["tokens"] if not t["special"])
    assert text == response.json()["generated_text"]
    # Beyond TGI: the routing summary, mean head weight per adapted layer.
    routing = details["routing"]
    assert set(routing) == {"per_layer", "mean_entropy"}
    assert len(routing["per_layer"]) == 2 * 3  # 2 layers x gate/up/down
    for layer in routing["per_layer"].values():
        assert len(layer["mean_weight"]) == 3 and sum(layer["mean_weight"]) == pytest.approx(1, abs=1e-4)


def test_stop_sequence(client, owner):
    headers, adapter_id = owner
    full = client.post("/generate", headers=headers, json=body(adapter_id, max_new_tokens=20, ignore_eos_token=True)).json()["generated_text"]
    stop = full[4:6]
    assert len(stop) == 2
    response = client.post("/generate", headers=headers, json=body(adapter_id, max_new_tokens=20, ignore_eos_token=True, stop=[stop], details=True))
    out = response.json()
    assert out["details"]["finish_reason"] == "stop_sequence" and out["details"]["generated_tokens"] < 20
    # Cut at the token that completed the stop text, which is kept, as TGI does (a token's text
    # can hold more than one character: the random tiny model emits broken UTF-8).
    assert full.startswith(out["generated_text"]) and out["generated_text"].startswith(full[: full.find(stop) + len(stop)])


def test_seed_reproducibility(client, owner):
    headers, adapter_id = owner
    sampled = dict(do_sample=True, temperature=1.5, max_new_tokens=16, ignore_eos_token=True, details=True)
    first = client.post("/generate", headers=headers, json=body(adapter_id, seed=42, **sampled)).json()
    again = client.post("/generate", headers=headers, json=body(adapter_id, seed=42, **sampled)).json()
    other = client.post("/generate", headers=headers, json=body(adapter_id, seed=7, **sampled)).json()
    # The same tokens and text. Floats agree to rounding: a request still leaving the batch can
    # make a step's matmuls another shape (continuous batching promises no bitwise equality).
    assert first["generated_text"] == again["generated_text"] and first["details"]["seed"] == again["details"]["seed"] == 42
    assert [t["id"] for t in first["details"]["tokens"]] == [t["id"] for t in again["details"]["tokens"]]
    assert [t["logprob"] for t in first["details"]["tokens"]] == pytest.approx([t["logprob"] for t in again["details"]["tokens"]], abs=1e-5)
    assert first["details"]["routing"]["mean_entropy"] == pytest.approx(again["details"]["routing"]["mean_entropy"], abs=1e-5)
    assert [t["id"] for t in other["details"]["tokens"]] != [t["id"] for t in first["details"]["tokens"]]
    drawn = client.post("/generate", headers=headers, json=body(adapter_id, **sampled)).json()
    assert isinstance(drawn["details"]["seed"], int)  # drawn by the server, reported


def test_return_full_text(client, owner):
    headers, adapter_id = owner
    plain = client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)).json()["generated_text"]
    full = client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY, return_full_text=True)).json()["generated_text"]
    assert full == PROMPT + plain


# --- /generate_stream and / --------------------------------------------------------------------


def test_stream_tokens_add_up_to_the_final_text(client, owner):
    headers, adapter_id = owner
    response = client.post("/generate_stream", headers=headers, json=body(adapter_id, **GREEDY, details=True))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert len(events) == 12 and [e["index"] for e in events] == list(range(1, 13))
    for event in events[:-1]:
        assert event["generated_text"] is None and event["details"] is None
    last = events[-1]
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == last["generated_text"]
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 12
    n_prompt = len(PROMPT.encode()) + 1
    assert last["details"]["input_length"] == last["details"]["prompt_tokens"] == n_prompt and last["details"]["routing"]["per_layer"]
    plain = client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)).json()
    assert last["generated_text"] == plain["generated_text"]

    no_details = sse_events(client.post("/generate_stream", headers=headers, json=body(adapter_id, **GREEDY)).text)
    assert no_details[-1]["details"] is None and no_details[-1]["generated_text"] == plain["generated_text"]


def test_compat_route_both_modes(client, owner):
    headers, adapter_id = owner
    single = client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY, details=True)).json()
    listed = client.post("/", headers=headers, json={**body(adapter_id, **GREEDY, details=True), "stream": False})
    assert listed.status_code == 200 and listed.json() == [single]
    assert client.post("/", headers=headers, json=body(adapter_id, **GREEDY)).json() == [{"generated_text": single["generated_text"]}]

    streamed = client.post("/", headers=headers, json={**body(adapter_id, **GREEDY, details=True), "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    direct = client.post("/generate_stream", headers=headers, json=body(adapter_id, **GREEDY, details=True))
    assert sse_events(streamed.text) == sse_events(direct.text)


def test_an_error_after_the_stream_began_is_an_error_event(client, app, owner, monkeypatch):
    headers, adapter_id = owner
    runner = get_engine(app).base_model("tiny")

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner, "_decode_step", broken_step)  # the prefill's token goes out, then this
    response = client.post("/generate_stream", headers=headers, json=body(adapter_id, **GREEDY))
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0]["index"] == 1 and events[0]["token"]["text"] is not None
    assert events[-1] == {"error": "Request failed during generation", "error_type": "generation"}
    plain = TestClient(app, raise_server_exceptions=False)  # no lifespan: the app is running already
    assert error_of(plain.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)), 500)["code"] == "internal_error"
    monkeypatch.undo()
    assert client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)).status_code == 200


def test_full_tgi_and_lorax_client_bodies_with_defaults_are_accepted(client, owner):
    headers, adapter_id = owner
    tgi = {  # what huggingface_hub / text_generation send, every field at its default
        "inputs": PROMPT,
        "parameters": {
            "best_of": None, "decoder_input_details": False, "details": True, "do_sample": False,
            "frequency_penalty": None, "grammar": None, "max_new_tokens": 8, "repetition_penalty": None,
            "return_full_text": False, "seed": None, "stop": [], "temperature": None, "top_k": None,
            "top_n_tokens": None, "top_p": None, "truncate": None, "typical_p": None, "watermark": False,
            "adapter_id": adapter_id,
        },
        "stream": False,
    }
    lorax = {  # the LoRAX client's Parameters
        "inputs": PROMPT,
        "parameters": {
            "adapter_id": adapter_id, "adapter_source": None, "merged_adapters": None, "api_token": None,
            "best_of": None, "decoder_input_details": False, "details": True, "do_sample": False,
            "ignore_eos_token": False, "max_new_tokens": 8, "repetition_penalty": None, "return_full_text": False,
            "seed": None, "stop": [], "temperature": None, "top_k": None, "top_p": None, "truncate": None,
            "typical_p": None, "watermark": False, "response_format": None, "return_k_alternatives": None,
            "apply_chat_template": False, "adapter_parameters": None, "presence_penalty": None,
        },
        "stream": False,
    }
    all_null = {"inputs": PROMPT, "parameters": {name: None for name in {**tgi["parameters"], **lorax["parameters"]}}}
    expected = client.post("/generate", headers=headers, json=body(adapter_id, max_new_tokens=8)).json()["generated_text"]
    for request in (tgi, lorax):
        for path in ("/generate", "/generate_stream", "/"):
            response = client.post(path, headers=headers, json=request)
            assert response.status_code == 200, (path, response.text)
            if path == "/generate":
                assert response.json()["generated_text"] == expected and response.json()["details"]["finish_reason"]
    assert client.post("/generate", headers=headers, json=all_null).status_code == 200
    local = {**lorax, "parameters": {**lorax["parameters"], "adapter_source": "local"}}
    assert client.post("/generate", headers=headers, json=local).json()["generated_text"] == expected  # an id, whatever the source
    assert client.post("/generate", headers=headers, json={"inputs": PROMPT}).status_code == 200  # no parameters at all


def test_tgi_parameters_accept_defaults_and_refuse_unsupported_features():
    tgi_defaults = {"best_of": None, "decoder_input_details": False, "details": True, "do_sample": False,
                    "max_new_tokens": 20, "repetition_penalty": None, "return_full_text": False, "seed": None,
                    "stop": [], "temperature": None, "top_k": None, "top_n_tokens": None, "top_p": None,
                    "truncate": None, "typical_p": None, "watermark": False, "adapter_id": "x",
                    "adapter_source": "local", "merged_adapters": None, "response_format": None, "api_token": None}
    params = GenerateParameters(**tgi_defaults).generation_params()
    assert params.max_new_tokens == 20 and params.details and not params.sampling
    for name, value in [("best_of", 2), ("watermark", True), ("merged_adapters", {"ids": ["a"]}), ("typical_p", 0.5)]:
        with pytest.raises(GenerationValidationError) as info:
            GenerateParameters(**{**tgi_defaults, name: value}).generation_params()
        assert info.value.field == name
    assert GenerateParameters(temperature=0.7).generation_params().sampling  # TGI: a warper turns sampling on


def test_tgi_bodies_of_a_result_and_of_the_last_stream_event(app):
    params = GenerationParams(max_new_tokens=3, details=True, decoder_input_details=True)
    result = get_engine(app).generate(PROMPT, params, base_model="tiny")
    body = generate_response(result, details=True)
    assert set(body["details"]) >= {"finish_reason", "generated_tokens", "prompt_tokens", "seed", "prefill", "tokens", "routing"}
    final = list(get_engine(app).submit(PROMPT, params, base_model="tiny").events(timeout=30))[-1]
    assert stream_event(final, details=True)["details"]["finish_reason"] == "length"


BAD_PARAMETERS = [
    ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
    ({"max_new_tokens": MAX_NEW_TOKENS + 1}, "parameters.max_new_tokens"),
    ({"max_new_tokens": "5"}, "parameters.max_new_tokens"),
    ({"temperature": 0}, "parameters.temperature"),
    ({"top_p": 1.5}, "parameters.top_p"),
    ({"best_of": 2}, "parameters.best_of"),
    ({"watermark": True}, "parameters.watermark"),
    ({"typical_p": 0.5}, "parameters.typical_p"),
    ({"top_n_tokens": 3}, "parameters.top_n_tokens"),
    ({"merged_adapters": {"ids": ["a", "b"], "weights": [0.5, 0.5]}}, "parameters.merged_adapters"),
    ({"response_format": {"type": "json_object"}}, "parameters.response_format"),
    ({"return_k_alternatives": 2}, "parameters.return_k_alternatives"),
    ({"apply_chat_template": True}, "parameters.apply_chat_template"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "parameters.stop"),
    ({"adapter_id": "/etc/passwd", "adapter_source": "local"}, "parameters.adapter_id"),
    ({"adapter_id": "../../jobs/x/adapter", "adapter_source": "local"}, "parameters.adapter_id"),
    ({"adapter_id": "org/some-lora", "adapter_source": "hub"}, "parameters.adapter_id"),
    ({"adapter_id": "whatever", "adapter_source": "s3"}, "parameters.adapter_source"),
]


@pytest.mark.parametrize("parameters, field", BAD_PARAMETERS, ids=[f for _, f in BAD_PARAMETERS])
def test_bad_parameters_are_422_naming_the_field(client, owner, parameters, field):
    headers, adapter_id = owner
    request = {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, **parameters}}
    for path in ("/generate", "/generate_stream", "/"):
        error = error_of(client.post(path, headers=headers, json=request), 422)
        assert error["error_type"] == "validation" and error["code"] == "invalid_request" and error["field"] == field, error


def test_bad_inputs_are_422(client, owner):
    headers, adapter_id = owner
    assert error_of(client.post("/generate", headers=headers, json={"parameters": {}}), 422)["field"] == "inputs"
    assert error_of(client.post("/generate", headers=headers, json=body(adapter_id, inputs="")), 422)["field"] == "inputs"
    too_long = body(adapter_id, inputs="x" * 1100, max_new_tokens=4)  # the tiny model's context is 1024
    assert error_of(client.post("/generate", headers=headers, json=too_long), 422)["field"] == "inputs"
    truncated = body(adapter_id, inputs="x" * 1100, max_new_tokens=4, truncate=32, details=True)
    assert client.post("/generate", headers=headers, json=truncated).json()["details"]["prompt_tokens"] == 32


# --- tenancy, deletion, auth -------------------------------------------------------------------


def test_another_tenants_adapter_is_404(client, app, owner):
    _, adapter_id = owner
    _, other = new_tenant(app, "other")
    for path in ("/generate", "/generate_stream", "/"):
        assert error_of(client.post(path, headers=other, json=body(adapter_id, **GREEDY)), 404)["code"] == "not_found"
        assert error_of(client.post(path, headers=other, json=body("ad-0000unknown", **GREEDY)), 404)["code"] == "not_found"
    # even named as a "local" source: ids are looked up in the caller's adapters, never as paths
    local = body(adapter_id, adapter_source="local", **GREEDY)
    assert error_of(client.post("/generate", headers=other, json=local), 404)["code"] == "not_found"


def test_deleted_adapter_is_evicted_and_404(client, app, tiny_model_path):
    tenant_id, headers = new_tenant(app, "deleter")
    adapter_id = make_adapter(app, tiny_model_path, tenant_id, seed=5)
    assert client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)).status_code == 200
    engine = get_engine(app)
    assert engine.adapters.get(adapter_id) is not None
    assert client.delete(f"/v1/adapters/{adapter_id}", headers=headers).status_code == 200
    assert engine.adapters.get(adapter_id) is None
    for path in ("/generate", "/generate_stream", "/"):
        assert error_of(client.post(path, headers=headers, json=body(adapter_id, **GREEDY)), 404)["code"] == "not_found"


def test_missing_adapter_files_are_410(client, app, tiny_model_path):
    import shutil

    tenant_id, headers = new_tenant(app, "gone")
    adapter_id = make_adapter(app, tiny_model_path, tenant_id, seed=6)
    with app.state.db.session() as session:
        shutil.rmtree(session.get(Adapter, adapter_id).path)
    assert error_of(client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)), 410)["code"] == "adapter_files_missing"


@pytest.mark.parametrize("authorization", [None, "Bearer rlk_not-a-key"], ids=["missing", "wrong-key"])
def test_generate_routes_need_a_key(client, owner, authorization):
    _, adapter_id = owner
    headers = {"Authorization": authorization} if authorization else {}
    for path in ("/generate", "/generate_stream", "/"):
        response = client.post(path, headers=headers, json=body(adapter_id, **GREEDY))
        assert error_of(response, 401)["code"] == "unauthorized"


def test_postgresql_round_trip(tmp_path, tiny_model_path):
    with fresh_postgres_database() as url:
        settings = make_settings(tmp_path, url, inference_device="cpu")
        app = create_app(settings)
        with TestClient(app) as client:
            tenant_id, headers = new_tenant(app)
            adapter_id = make_adapter(app, tiny_model_path, tenant_id)
            response = client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY, details=True))
            assert response.status_code == 200 and response.json()["details"]["generated_tokens"] == 12
            _, other = new_tenant(app)
            assert error_of(client.post("/generate", headers=other, json=body(adapter_id, **GREEDY)), 404)["code"] == "not_found"
            assert client.delete(f"/v1/adapters/{adapter_id}", headers=headers).status_code == 200
            assert error_of(client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)), 404)["code"] == "not_found"


# --- client disconnects (a real server: the test client does not stream) ------------------------


@pytest.fixture(scope="module")
def live(settings, tiny_model_path):
    """A uvicorn server in a thread, its decode loop slowed to 20 ms a step so a long request
    is still running when the client leaves: (base URL, app, runner, tenant headers, adapter)."""
    app = create_app(settings)
    with served_in_thread(app) as url:
        runner = get_engine(app).base_model("tiny")
        step = runner._decode_step

        def slow_step():
            time.sleep(0.02)
            step()

        runner._decode_step = slow_step
        tenant_id, headers = new_tenant(app, "live")
        adapter_id = make_adapter(app, tiny_model_path, tenant_id)
        yield url, app, runner, headers, adapter_id


def idle(runner) -> bool:
    return runner.running == 0 and runner.pending == 0


def test_closing_the_stream_cancels_the_request(live):
    url, _, runner, headers, adapter_id = live
    wait_for(lambda: idle(runner), timeout=10, message="an idle engine")
    steps = runner.steps
    long = body(adapter_id, max_new_tokens=MAX_NEW_TOKENS, ignore_eos_token=True)
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/generate_stream", headers=headers, json=long) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(lines)
            assert first.startswith("data: ") and json.loads(first[6:])["index"] == 1
            third = [line for line, _ in zip(filter(None, lines), range(2))][-1]
            assert json.loads(third[6:])["index"] == 3  # still streaming while the client reads
            assert runner.running == 1
        # leaving the block closes the connection
    wait_for(lambda: idle(runner), timeout=5, message="the request to be cancelled")
    assert runner.steps - steps < MAX_NEW_TOKENS // 2  # stopped early, not run to the end (6 s)


def test_a_generate_client_leaving_cancels_the_request(live):
    url, _, runner, headers, adapter_id = live
    wait_for(lambda: idle(runner), timeout=10, message="an idle engine")
    steps = runner.steps
    long = body(adapter_id, max_new_tokens=MAX_NEW_TOKENS, ignore_eos_token=True)
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=0.5)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/generate", headers=headers, json=long)
    wait_for(lambda: idle(runner), timeout=5, message="the request to be cancelled")
    assert runner.steps - steps < MAX_NEW_TOKENS // 2
    # the server is fine afterwards
    with httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/generate", headers=headers, json=body(adapter_id, **GREEDY))
        assert response.status_code == 200 and response.headers["x-generated-tokens"] == "12"


def test_null_parameters_and_stream_mean_defaults(client, owner):
    headers, _ = owner
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": None}, headers=headers)
    assert response.status_code == 200, response.text
    listed = client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}, "stream": None}, headers=headers)
    assert listed.status_code == 200 and isinstance(listed.json(), list)


def test_an_adapter_with_non_finite_weights_is_a_422_naming_the_adapter(app, client, tiny_model_path):
    from safetensors.torch import load_file, save_file

    tenant_id, headers = new_tenant(app, "nan")
    adapter_id = make_adapter(app, tiny_model_path, tenant_id)
    with app.state.db.session() as session:
        path = session.get(Adapter, adapter_id).path
    weights = f"{path}/adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("lora_B"))
    tensors[name][0, 0, 0] = float("inf")  # as a diverged job leaves it
    save_file(tensors, weights)
    error = error_of(client.post("/generate", headers=headers, json=body(adapter_id, **GREEDY)), 422)
    assert error["code"] == "adapter_unusable" and error["field"] == "parameters.adapter_id" and "not finite" in error["message"]
