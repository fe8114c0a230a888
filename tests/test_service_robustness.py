"""Hostile and malformed requests: each gets a 4xx in the one error shape, never a 500.

Regression tests for what fuzzing the API (schemathesis, plus hand-made bodies) found. The REST
part runs on SQLite and PostgreSQL (PostgreSQL refuses NUL in text and NaN or Infinity in JSON,
so some inputs only failed there); the /generate part on SQLite with the tiny model.
"""

from __future__ import annotations

import json
import math
import secrets

import pytest
from conftest_service import database_url, dataset, job_body, make_settings, upload
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.auth import create_tenant

JSON = {"content-type": "application/json"}


def error_of(response, status: int, code: str | None = None) -> dict:
    """The error of ``response``, checked to be in the one shape with ``status`` (on the TGI
    routes, TGI's ``{"error": message, "error_type"}`` with the same code and field)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if "error_type" in body:
        assert response.request.url.path in ("/generate", "/generate_stream", "/"), body
        assert set(body) <= {"error", "error_type", "code", "field"} and body["error_type"], body
        body = {"error": {"message": body["error"], **{key: body[key] for key in ("code", "field") if key in body}}}
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"code", "message", "field", "details"} and error["code"] and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture
def headers(new_tenant):  # noqa: F811
    return new_tenant("robust")


@pytest.fixture
def file_id(client, headers):  # noqa: F811
    response = upload(client, headers, dataset(4, task="add"))
    assert response.status_code == 201, response.text
    return response.json()["id"]


# --- JSON bodies that are not JSON, or not objects ----------------------------------------------


@pytest.mark.parametrize("path", ["/v1/jobs", "/generate", "/generate_stream", "/"])
@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"inputs": "\xff\xfe"}', "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"a": ' + b"9" * 5000 + b"}", "too many digits"),
    ],
    ids=["invalid-utf8", "syntax", "deep", "huge-int"],
)
def test_unparsable_json_is_422_saying_why(client, headers, path, raw, message):
    # Invalid UTF-8, deep nesting and huge integers were FastAPI's bare 400 "There was an error
    # parsing the body"; now they are what a syntax error is, a 422 saying what is wrong.
    error = error_of(client.post(path, headers={**headers, **JSON}, content=raw), 422, "invalid_request")
    assert message in error["message"] and error["field"] == "body"


def test_json_syntax_error_says_where(client, headers):
    error = error_of(client.post("/v1/jobs", headers={**headers, **JSON}, content=b'{"base_model": "tiny",\n "mixture": [}'), 422)
    assert "line 2, column" in error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_json_is_415(client, headers, file_id, content_type):
    extra = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/jobs", headers={**headers, **extra}, content=json.dumps(job_body(file_id)).encode())
    assert "application/json" in error_of(response, 415, "unsupported_media_type")["message"]


@pytest.mark.parametrize("raw, got", [(b"null", "null"), (b"[]", "an array"), (b'"x"', "a string"), (b"1", "a number")])
def test_a_body_that_is_not_an_object_is_422(client, headers, raw, got):
    error = error_of(client.post("/v1/jobs", headers={**headers, **JSON}, content=raw), 422, "invalid_request")
    assert error["field"] == "body" and error["message"].endswith(got)


def test_a_missing_body_is_422(client, headers):
    error = error_of(client.post("/generate", headers=headers), 422)
    assert error["field"] == "body"


# --- job bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, value, field",
    [
        ("weight", "1e309", "mixture[0].weight"),
        ("weight", "NaN", "mixture[0].weight"),
        ("weight", "-Infinity", "mixture[0].weight"),
        ("learning_rate", "NaN", "training.learning_rate"),
        ("validation_share", "NaN", "training.validation_share"),
        ("epochs", "Infinity", "training.epochs"),
        ("alpha", "NaN", "adapter.alpha"),
        ("alpha", "1e309", "adapter.alpha"),
        ("gamma", "NaN", "adapter.gamma"),
        ("init_scale", "Infinity", "adapter.init_scale"),
        ("target_modules", '{"gate_proj": 1}', "adapter.target_modules"),
    ],
)
def test_non_finite_numbers_and_odd_types_in_a_job_are_422(client, headers, file_id, where, value, field):
    # NaN and Infinity were accepted, stored, and (on PostgreSQL, whose JSON has neither) a 500.
    body = job_body(file_id)
    marker = "__VALUE__"
    if field.startswith("mixture"):
        body["mixture"][0][where] = marker
    elif field.startswith("training"):
        body["training"][where] = marker
    else:
        body["adapter"][where] = marker
    raw = json.dumps(body).replace(f'"{marker}"', value)
    error = error_of(client.post("/v1/jobs", headers={**headers, **JSON}, content=raw.encode()), 422, "invalid_request")
    assert error["field"] == field, error


def test_lone_surrogates_in_a_job_are_422(client, headers, file_id):
    body = job_body(file_id)
    body["adapter"]["target_modules"] = ["\ud800"]
    raw = json.dumps(body)  # ASCII, with the surrogate as the escape \ud800
    error = error_of(client.post("/v1/jobs", headers={**headers, **JSON}, content=raw.encode()), 422)
    assert error["field"] == "adapter.target_modules[0]" and "surrogate" in error["message"]


def test_nul_in_ids_is_a_miss_not_a_server_error(client, headers, file_id):
    # PostgreSQL refuses NUL in a query parameter: each of these was a 500 there.
    for path in ("/v1/files/a%00b", "/v1/jobs/a%00b", "/v1/adapters/a%00b", "/v1/jobs/%00/events", "/v1/jobs/%00/metrics",
                 "/v1/adapters/%00/download"):
        error_of(client.get(path, headers=headers), 404, "not_found")
    error_of(client.post("/v1/jobs/%00/cancel", headers=headers), 404)
    error_of(client.delete("/v1/files/%00", headers=headers), 404)
    error_of(client.delete("/v1/adapters/%00", headers=headers), 404)
    for path in ("/v1/files", "/v1/jobs", "/v1/adapters"):
        assert error_of(client.get(f"{path}?after=%00", headers=headers), 422)["field"] == "after"
    body = job_body(file_id)
    body["mixture"][0]["validation_file_id"] = "a\x00b"
    assert error_of(client.post("/v1/jobs", headers=headers, json=body), 422)["field"] == "mixture[0].validation_file_id"


def test_event_cursor_beyond_the_id_column_is_422(client, headers, file_id):
    # Event ids are 32-bit; a bigger cursor overflowed the query (SQLite and PostgreSQL): a 500.
    job = client.post("/v1/jobs", headers=headers, json=job_body(file_id)).json()
    for after in (2**31, 2**63, 10**30):
        error = error_of(client.get(f"/v1/jobs/{job['id']}/events?after={after}", headers=headers), 422)
        assert error["field"] == "after"
    assert client.get(f"/v1/jobs/{job['id']}/events?after={2**31 - 1}", headers=headers).status_code == 200


@pytest.mark.parametrize("query", ["limit=-1", "limit=abc", "limit=0", "limit=100000", "after=" + "x" * 200])
def test_bad_page_parameters_are_422_naming_them(client, headers, query):
    error = error_of(client.get(f"/v1/files?{query}", headers=headers), 422)
    assert error["field"] == query.split("=")[0] and error["message"].startswith(error["field"])


def test_bad_status_filter_is_422(client, headers):
    assert error_of(client.get("/v1/jobs?status=bogus", headers=headers), 422)["field"] == "status"


# --- uploads ------------------------------------------------------------------------------------


def multipart(client, headers, body: bytes, boundary: str = "b"):
    return client.post("/v1/files", headers={**headers, "content-type": f"multipart/form-data; boundary={boundary}"}, content=body)


def file_part(content: bytes, filename: bytes = b"data.jsonl", boundary: bytes = b"b", close: bool = True) -> bytes:
    body = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n\r\n' + content
    return body + (b"\r\n--" + boundary + b"--\r\n" if close else b"")


def test_an_overlong_multipart_boundary_is_422(client, headers):
    error = error_of(multipart(client, headers, b"x", boundary="b" * 5000), 422)
    assert error["field"] == "file" and "Boundary length" in error["message"]


def test_a_truncated_multipart_body_is_422(client, headers):
    error = error_of(multipart(client, headers, file_part(dataset(2).encode(), close=False)), 422)
    assert "closing boundary" in error["message"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a", "completion": "b", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n", "nested too deeply"),
        (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
        (b'{"prompt": "a", "completion": "b", "x": ' + b"1" * 5000 + b"}\n", "too many digits"),
        (b'[{"prompt": "a", "completion": "b", "x": ' + b"1" * 5000 + b"}]", "too many digits"),
        (b'{"prompt": "\\ud800", "completion": "b"}\n', "unpaired surrogate"),
        (b'{"prompt": "a", "completion": "b", "task": "\\udfff"}\n', "unpaired surrogate"),
    ],
    ids=["deep-jsonl", "deep-array", "huge-int-jsonl", "huge-int-array", "surrogate", "surrogate-task"],
)
def test_pathological_datasets_are_422(client, headers, content, message):
    error = error_of(upload(client, headers, content), 422, "invalid_dataset")
    assert message in error["message"] and error["field"] == "file"


def test_control_characters_leave_the_filename(client, headers):
    response = multipart(client, headers, file_part(dataset(2).encode(), filename=b"a\x00b\x01\tc.jsonl"))
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "abc.jsonl"


# --- the documented error shape -----------------------------------------------------------------


def test_openapi_documents_the_one_error_shape(client):
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    # The routes of other APIs answer in those APIs' shapes (TGI's, OpenAI's), and say so.
    shapes = {"/generate": "TGIError", "/generate_stream": "TGIError", "/": "TGIError", "/v1/chat/completions": "OpenAIErrorResponse",
              "/v1/completions": "OpenAIErrorResponse"}
    for path, methods in schema["paths"].items():
        shape = "OpenAIErrorResponse" if path.startswith("/v1/fine_tuning/") else shapes.get(path, "ErrorResponse")
        for method, operation in methods.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{shape}"}, (method, path, status)
    assert {"401", "415", "422"} <= set(schema["paths"]["/v1/jobs"]["post"]["responses"])
    assert {"401", "404"} <= set(schema["paths"]["/v1/files/{file_id}"]["get"]["responses"])


def test_a_database_outage_is_503_not_500(service_settings, tmp_path):  # noqa: F811
    from service.db import Database

    app = create_app(service_settings)
    with TestClient(app) as client:
        app.state.db.dispose()
        app.state.db = Database(f"sqlite:///{tmp_path / 'missing' / 'rlora.db'}")  # cannot be opened
        # Liveness stays up (a restart would not bring the database back); readiness says why not.
        assert client.get("/health").json() == {"status": "ok"}
        response = client.get("/ready")
        error = error_of(response, 503, "not_ready")
        assert response.headers["retry-after"] and [d["component"] for d in error["details"]] == ["database"]
        response = client.get("/v1/files", headers={"Authorization": "Bearer rlk_x"})
        assert error_of(response, 503, "unavailable") and response.headers["retry-after"]



def test_connections_the_database_dropped_cost_no_read_and_no_500(tmp_path):
    """What a PostgreSQL restart does to the pool (every connection killed): a read runs again
    on a fresh connection, any other request is at worst a 503, and the pool recovers."""
    import psycopg
    from conftest_service import POSTGRES_ADMIN_URL, fresh_postgres_database
    from sqlalchemy.engine import make_url

    with fresh_postgres_database() as url:
        app = create_app(make_settings(tmp_path, url))
        with TestClient(app) as client:
            with app.state.db.session() as session:
                _, key = create_tenant(session, f"drop-{secrets.token_hex(4)}")
            client.headers["Authorization"] = f"Bearer {key}"
            file_id = upload(client, client.headers, dataset()).json()["id"]

            def drop_connections() -> None:
                with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                        (make_url(url).database,),
                    )

            drop_connections()
            assert client.get(f"/v1/files/{file_id}").status_code == 200
            drop_connections()
            assert client.post("/v1/jobs", json=job_body(file_id)).status_code in (201, 503)
            assert client.post("/v1/jobs", json=job_body(file_id)).status_code == 201

# --- /generate (SQLite, the tiny model) ----------------------------------------------------------


@pytest.fixture(scope="module")
def gen_client(tmp_path_factory, one_torch_thread):
    home = tmp_path_factory.mktemp("robust-generate")
    with database_url("sqlite", home) as url:
        settings = make_settings(home, url, max_new_tokens=64, inference_device="cpu")
        application = create_app(settings)
        with TestClient(application) as test_client:
            with application.state.db.session() as session:
                _, key = create_tenant(session, f"gen-{secrets.token_hex(4)}")
            test_client.headers["Authorization"] = f"Bearer {key}"
            yield test_client


def generate(client, raw: str | dict, path: str = "/generate"):
    content = raw if isinstance(raw, str) else json.dumps(raw)
    return client.post(path, headers=JSON, content=content.encode())


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"inputs": "\\ud800", "parameters": {"max_new_tokens": 2}}', "inputs"),
        ('{"inputs": "hi \\udfff there"}', "inputs"),
        ('{"inputs": "hi", "parameters": {"stop": ["\\udc00"]}}', "parameters.stop[0]"),
        ('{"inputs": "hi", "parameters": {"adapter_id": "\\ud800x"}}', "parameters.adapter_id"),
    ],
)
def test_lone_surrogates_are_422_not_a_tokenizer_crash(gen_client, path, raw, field):
    error = error_of(generate(gen_client, raw, path), 422, "invalid_request")
    assert error["field"] == field and "surrogate" in error["message"]


def test_a_surrogate_pair_is_fine(gen_client):
    assert generate(gen_client, '{"inputs": "\\ud83d\\ude00", "parameters": {"max_new_tokens": 1}}').status_code == 200


@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"inputs": "hi", "parameters": {"temperature": 1e309, "do_sample": true}}', "parameters.temperature"),
        ('{"inputs": "hi", "parameters": {"temperature": NaN}}', "parameters.temperature"),
        ('{"inputs": "hi", "parameters": {"repetition_penalty": Infinity}}', "parameters.repetition_penalty"),
        ('{"inputs": "hi", "parameters": {"top_p": NaN}}', "parameters.top_p"),
    ],
)
def test_non_finite_sampling_parameters_are_422(gen_client, raw, field):
    assert error_of(generate(gen_client, raw), 422)["field"] == field


@pytest.mark.parametrize(
    "parameters",
    [
        {"temperature": 1e-300, "do_sample": True},  # was a 500: the softmax of inf / inf
        {"temperature": 5e-324, "top_k": 5, "top_p": 0.5, "seed": 1},
        {"temperature": 1e300, "do_sample": True, "top_p": 0.9},
        {"repetition_penalty": 1e-300},
        {"repetition_penalty": 5e-324, "do_sample": True, "temperature": 0.5},
        {"repetition_penalty": 1e300, "do_sample": True},
    ],
)
def test_extreme_sampling_parameters_generate_with_finite_logprobs(gen_client, parameters):
    body = {"inputs": "hi hi hi", "parameters": {**parameters, "max_new_tokens": 3, "details": True, "ignore_eos_token": True}}
    response = generate(gen_client, body)
    assert response.status_code == 200, response.text
    tokens = response.json()["details"]["tokens"]
    assert len(tokens) == 3 and all(math.isfinite(token["logprob"]) for token in tokens)


@pytest.mark.parametrize(
    "parameters, field",
    [
        ({"max_new_tokens": 2**70}, "parameters.max_new_tokens"),
        ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
        ({"stop": [""]}, "parameters.stop"),
        ({"stop": ["a"] * 100}, "parameters.stop"),
        ({"seed": -1, "do_sample": True}, "parameters.seed"),
        ({"seed": 2**64, "do_sample": True}, "parameters.seed"),
        ({"truncate": 2**70}, "parameters.truncate"),
        ({"top_k": 2**70, "top_n_tokens": 3}, "parameters.top_n_tokens"),
    ],
)
def test_out_of_range_parameters_are_422_naming_them(gen_client, parameters, field):
    assert error_of(generate(gen_client, {"inputs": "hi", "parameters": parameters}), 422)["field"] == field


def test_huge_and_unicode_inputs(gen_client):
    error = error_of(generate(gen_client, {"inputs": "é😀" * 50_000, "parameters": {"max_new_tokens": 1}}), 422)
    assert error["field"] == "inputs" and "truncate" in error["message"]
    response = generate(gen_client, {"inputs": "x\x00é😀" * 25_000, "parameters": {"max_new_tokens": 1, "truncate": 8}})
    assert response.status_code == 200, response.text
    error_of(generate(gen_client, {"inputs": "hi", "parameters": {"adapter_id": "a\x00b"}}), 404, "not_found")


def test_the_default_max_new_tokens_keeps_to_the_server_limit(gen_client):
    # Without max_new_tokens a request got the engine default (100), past RLORA_MAX_NEW_TOKENS (64).
    response = generate(gen_client, {"inputs": "hi", "parameters": {"ignore_eos_token": True, "details": True}})
    assert response.status_code == 200, response.text
    assert response.json()["details"]["generated_tokens"] == 64


def test_a_client_that_leaves_leaves_no_unretrieved_future(gen_client, caplog):
    # Each /generate whose client went away logged "Future exception was never retrieved".
    import asyncio
    import gc

    from rlora.serve import GenerationParams
    from service.api.inference import get_engine
    from service.api.generation import _result_unless_client_gone

    class Gone:
        async def receive(self):
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

    async def leave() -> None:
        engine = get_engine(gen_client.app)
        handle = await engine.asubmit("hi", GenerationParams(max_new_tokens=64, ignore_eos_token=True))
        assert await _result_unless_client_gone(Gone(), handle) is None
        await asyncio.sleep(0.2)  # the engine closes the cancelled request meanwhile
        gc.collect()

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(leave())
        gc.collect()
    assert "never retrieved" not in caplog.text
