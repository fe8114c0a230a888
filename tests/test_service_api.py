"""The REST API against real SQLite and PostgreSQL (each test runs on both)."""

from __future__ import annotations

import threading

import pytest
from conftest_service import dataset, job_body, make_settings, submit_job, upload

from service.jobs import states


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) <= {"code", "message", "field", "details"} and error["message"]
    return error


# --- health, auth, routing errors ---------------------------------------------------------


def test_health_needs_no_key(client):
    assert client.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer rlk_not-a-key", "Basic dXNlcjpwYXNz", "Bearer "],
    ids=["missing", "wrong-key", "wrong-scheme", "empty"],
)
def test_requests_without_a_valid_key_are_401(client, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in [("get", "/v1/files"), ("get", "/v1/jobs"), ("get", "/v1/adapters"), ("get", "/v1/models"), ("post", "/v1/jobs")]:
        response = getattr(client, method)(path, headers=headers)
        assert error_of(response, 401)["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_route_and_method_use_the_error_shape(client, new_tenant):
    headers = new_tenant()
    assert error_of(client.get("/v1/nothing", headers=headers), 404)["code"] == "not_found"
    assert error_of(client.put("/v1/files", headers=headers), 405)["code"] == "method_not_allowed"


def test_a_405_allows_every_method_of_the_path(client, new_tenant):
    # GET and POST /v1/files are two route objects; the 405 names both.
    response = client.put("/v1/files", headers=new_tenant())
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
    response = client.patch("/v1/files/file-x", headers=new_tenant())
    assert response.status_code == 405 and response.headers["allow"] == "DELETE, GET"


def test_the_openapi_document_says_how_to_authenticate_and_what_is_enforced(client):
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API key; on /v1/admin, RLORA_ADMIN_TOKEN",
    }
    paths = document["paths"]
    assert paths["/v1/files"]["get"]["security"] == [{"bearer": []}] and "security" not in paths["/health"]["get"]
    assert paths["/generate"]["post"]["security"] == [{"bearer": []}]
    limits = [p for path in paths.values() for op in path.values() for p in op.get("parameters", []) if p["name"] == "limit"]
    assert limits and all(p["schema"]["maximum"] == 100 and p["schema"]["minimum"] == 1 for p in limits)
    schemas = document["components"]["schemas"]
    assert schemas["GenerateRequest"]["properties"]["inputs"]["minLength"] == 1
    generated = paths["/generate"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert generated == {"$ref": "#/components/schemas/GenerateResponse"}
    assert {"generated_text", "details"} <= set(schemas["GenerateResponse"]["properties"])
    events = paths["/generate_stream"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]["oneOf"]
    for ref in events:  # every schema the stream refers to is in the document
        assert ref["$ref"].rsplit("/", 1)[1] in schemas
    assert {"input_length", "prompt_tokens"} <= set(schemas["StreamDetails"]["properties"])
    compat = paths["/"]["post"]["responses"]["200"]["content"]
    assert compat["application/json"]["schema"]["items"] == {"$ref": "#/components/schemas/GenerateResponse"}
    assert "text/event-stream" in compat


def test_models_lists_tiny(client, new_tenant):
    data = client.get("/v1/models", headers=new_tenant()).json()["data"]
    tiny = next(model for model in data if model["id"] == "tiny")
    assert tiny["object"] == "model" and tiny["owned_by"] == "system" and tiny["parent"] is None and isinstance(tiny["created"], int)


# --- files --------------------------------------------------------------------------------


def test_upload_list_get_and_delete_a_file(client, new_tenant, service_settings):
    headers = new_tenant()
    response = upload(client, headers, dataset(6, task="add") + dataset(4, task="sub"))
    assert response.status_code == 201, response.text
    file = response.json()
    assert file["format"] == "jsonl" and file["records"] == 10 and file["tasks"] == {"add": 6, "sub": 4}
    assert file["filename"] == "data.jsonl" and len(file["sha256"]) == 64
    blob = service_settings.files_dir / file["sha256"][:2] / file["sha256"]
    assert blob.read_text() == dataset(6, task="add") + dataset(4, task="sub")

    assert client.get(f"/v1/files/{file['id']}", headers=headers).json() == file
    assert [f["id"] for f in client.get("/v1/files", headers=headers).json()["data"]] == [file["id"]]

    assert client.delete(f"/v1/files/{file['id']}", headers=headers).json() == {"id": file["id"], "object": "file", "deleted": True}
    assert error_of(client.get(f"/v1/files/{file['id']}", headers=headers), 404)["code"] == "not_found"
    assert not blob.exists()


def test_same_content_is_stored_once(client, new_tenant, service_settings):
    first, second = new_tenant(), new_tenant()
    content = dataset(3, start=1000)
    a = upload(client, first, content).json()
    b = upload(client, second, content, name="again.json").json()
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    blob = service_settings.files_dir / a["sha256"][:2] / a["sha256"]
    client.delete(f"/v1/files/{a['id']}", headers=first)
    assert blob.exists(), "still used by the other tenant's file"
    client.delete(f"/v1/files/{b['id']}", headers=second)
    assert not blob.exists()


def test_json_array_upload(client, new_tenant):
    content = '[{"instruction": "add one", "input": "1", "output": "2"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]'
    file = upload(client, new_tenant(), content, name="d.json").json()
    assert file["format"] == "json" and file["records"] == 2 and file["shapes"] == {"alpaca": 1, "chat": 1}


def test_malformed_jsonl_is_422_with_line_numbers_and_nothing_stored(client, new_tenant, service_settings):
    headers = new_tenant()
    content = '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n{"prompt": "x"}\n'
    before = sorted(service_settings.files_dir.rglob("*"))
    error = error_of(upload(client, headers, content), 422)
    assert error["code"] == "invalid_dataset" and error["field"] == "file"
    assert [(d["line"], d["field"]) for d in error["details"]] == [(2, None), (3, "completion")]
    assert "line 2" in error["message"]
    assert sorted(service_settings.files_dir.rglob("*")) == before
    assert list(service_settings.tmp_dir.iterdir()) == []
    assert client.get("/v1/files", headers=headers).json()["data"] == []


def test_empty_upload_is_422(client, new_tenant):
    error = error_of(upload(client, new_tenant(), b""), 422)
    assert error["code"] == "invalid_dataset" and error["details"]


def test_oversize_upload_is_413_and_nothing_staged(client, new_tenant, service_settings):
    headers = new_tenant()
    big = dataset(4000)  # well over the 64 KiB limit of the test settings
    assert len(big) > service_settings.max_upload_bytes
    assert error_of(upload(client, headers, big), 413)["code"] == "payload_too_large"
    # Without a Content-Length the stream itself is cut off at the limit.
    chunks = (big[i : i + 8192].encode() for i in range(0, len(big), 8192))
    boundary = "rlora-test-boundary"
    body = iter([f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'.encode(), *chunks, f"\r\n--{boundary}--\r\n".encode()])
    response = client.post("/v1/files", headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}, content=body)
    assert error_of(response, 413)["code"] == "payload_too_large"
    assert list(service_settings.tmp_dir.iterdir()) == []
    assert client.get("/v1/files", headers=headers).json()["data"] == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"content": b'{"prompt": "a"}', "headers": {"Content-Type": "application/json"}},
        {"files": {"other": ("d.jsonl", b"x")}},
        {"content": b"--b\r\ngarbage", "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
    ],
    ids=["not-multipart", "no-file-field", "malformed-multipart"],
)
def test_bad_upload_requests_are_422(client, new_tenant, kwargs):
    headers = {**new_tenant(), **kwargs.pop("headers", {})}
    error = error_of(client.post("/v1/files", headers=headers, **kwargs), 422)
    assert error["field"] == "file"


def test_oversize_json_body_is_413_but_uploads_keep_their_own_limit(tmp_path):
    import json

    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.auth import create_tenant

    # A JSON limit far below the upload limit: uploads between the two must still pass.
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'rlora.db'}", max_json_bytes=2048, max_upload_bytes=64 * 1024)
    limited = create_app(settings)
    with TestClient(limited) as client:
        with limited.state.db.session() as session:
            headers = {"Authorization": f"Bearer {create_tenant(session, 'limits')[1]}"}
        content = dataset(400)
        assert 2048 < len(content) < 64 * 1024
        file_id = upload(client, headers, content).json()["id"]

        body = job_body(file_id)
        assert client.post("/v1/jobs", headers=headers, json=body).status_code == 201, "under the limit"
        big = {**body, "base_model": "x" * 4096}
        error = error_of(client.post("/v1/jobs", headers=headers, json=big), 413)
        assert error["code"] == "payload_too_large" and "2048" in error["message"]
        # Without a Content-Length (chunked), the body is cut off at the limit too...
        raw = json.dumps(big).encode()
        chunks = iter([raw[i : i + 512] for i in range(0, len(raw), 512)])
        response = client.post("/v1/jobs", headers={**headers, "Content-Type": "application/json"}, content=chunks)
        assert error_of(response, 413)["code"] == "payload_too_large"
        # ...and a small chunked body still reaches the route.
        response = client.post("/v1/jobs", headers={**headers, "Content-Type": "application/json"}, content=iter([json.dumps(body).encode()]))
        assert response.status_code == 201, response.text
        # Before authentication: a stranger's oversize body is refused unread.
        assert error_of(client.post("/v1/jobs", json=big), 413)["code"] == "payload_too_large"
        assert len(client.get("/v1/jobs", headers=headers).json()["data"]) == 2


# --- jobs ---------------------------------------------------------------------------------


def test_submit_list_get_and_events(client, new_tenant):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    job = submit_job(client, headers, file_id)
    assert job["status"] == "queued" and job["attempt"] == 0 and job["progress"] is None and job["error"] is None
    assert job["adapter"]["heads"] == 2 and job["adapter"]["alpha"] == 32.0, "adapter settings come back normalised"
    assert job["training"]["max_steps"] == 4 and job["training"]["learning_rate"] == 2e-4

    assert client.get(f"/v1/jobs/{job['id']}", headers=headers).json() == job
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=headers).json()["data"]
    assert [e["kind"] for e in events] == ["created"] and events[0]["data"] == {"queue": "rlora.cpu"}
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics", headers=headers).json()
    assert metrics == {"job_id": job["id"], "status": "queued", "final": False, "train_loss": [], "metrics": None}


def test_jobs_are_queued_by_device_class(client, new_tenant):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    queues = {}
    for device in ("cpu", "cuda", "auto"):
        job = submit_job(client, headers, file_id, device=device)
        queues[device] = client.get(f"/v1/jobs/{job['id']}/events", headers=headers).json()["data"][0]["data"]["queue"]
    assert queues == {"cpu": "rlora.cpu", "cuda": "rlora.gpu", "auto": "rlora.cpu"}


def test_events_page_after_the_last_seen(client, new_tenant):
    headers = new_tenant()
    job_id = submit_job(client, headers, upload(client, headers, dataset()).json()["id"])["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    first = client.get(f"/v1/jobs/{job_id}/events", headers=headers, params={"limit": 1}).json()
    assert [e["kind"] for e in first["data"]] == ["created"] and first["next_cursor"] == str(first["data"][0]["id"])
    rest = client.get(f"/v1/jobs/{job_id}/events", headers=headers, params={"after": first["next_cursor"]}).json()
    assert [e["kind"] for e in rest["data"]] == ["finished"] and rest["next_cursor"] is None


def test_job_list_filters_and_pages(client, new_tenant):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    ids = [submit_job(client, headers, file_id)["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"after": cursor} if cursor else {})}
        page = client.get("/v1/jobs", headers=headers, params=params).json()
        seen += [job["id"] for job in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1], "newest first, each job once"
    queued = client.get("/v1/jobs", headers=headers, params={"status": "queued"}).json()["data"]
    assert {job["id"] for job in queued} == set(ids[1:])
    cancelled = client.get("/v1/jobs", headers=headers, params={"status": "cancelled"}).json()["data"]
    assert [job["id"] for job in cancelled] == [ids[0]]
    assert error_of(client.get("/v1/jobs", headers=headers, params={"status": "bogus"}), 422)["field"] == "status"
    assert error_of(client.get("/v1/jobs", headers=headers, params={"limit": 1000}), 422)["field"] == "limit"


def test_bad_job_bodies_are_422_naming_the_field(client, new_tenant):
    headers, other = new_tenant(), new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    foreign_id = upload(client, other, dataset()).json()["id"]

    def field_errors(change) -> list[str]:
        body = job_body(file_id)
        change(body)
        error = error_of(client.post("/v1/jobs", headers=headers, json=body), 422)
        return [d.get("field") for d in error["details"]]

    assert field_errors(lambda b: b.update(base_model="no-such-model")) == ["base_model"]
    assert field_errors(lambda b: b["mixture"][0].update(file_id="file-missing")) == ["mixture[0].file_id"]
    assert field_errors(lambda b: b["mixture"][0].update(file_id=foreign_id)) == ["mixture[0].file_id"]
    assert field_errors(lambda b: b["mixture"][0].update(validation_file_id=foreign_id)) == ["mixture[0].validation_file_id"]
    assert field_errors(lambda b: b["mixture"][0].update(weight=0)) == ["mixture[0].weight"]
    assert field_errors(lambda b: b["mixture"][0].update(weight=-1)) == ["mixture[0].weight"]
    assert field_errors(lambda b: b["mixture"][0].update(task="has space")) == ["mixture[0].task"]
    assert field_errors(lambda b: b["adapter"].update(rank=0)) == ["adapter.rank"]
    assert field_errors(lambda b: b["adapter"].update(heads=65)) == ["adapter.heads"]
    assert field_errors(lambda b: b["adapter"].update(method="lora")) == ["adapter.heads"]
    assert field_errors(lambda b: b["adapter"].update(colour="blue")) == ["adapter.colour"]
    assert field_errors(lambda b: b["training"].update(max_steps=0)) == ["training.max_steps"]
    assert field_errors(lambda b: b["training"].update(unknown=1)) == ["training.unknown"]
    assert field_errors(lambda b: b.update(mixture=[])) == ["mixture"]
    assert field_errors(lambda b: b["mixture"].append(dict(b["mixture"][0]))) == ["mixture"]  # one task twice
    assert field_errors(lambda b: b.update(extra=1)) == ["extra"]
    assert field_errors(lambda b: b.pop("base_model")) == ["base_model"]
    # Several problems at once are all reported.
    assert field_errors(lambda b: (b.update(base_model="x"), b["adapter"].update(rank=0))) == ["base_model", "adapter.rank"]

    error = error_of(client.post("/v1/jobs", headers={**headers, "Content-Type": "application/json"}, content=b"{not json"), 422)
    assert error["code"] == "invalid_request"
    assert client.get("/v1/jobs", headers=headers).json()["data"] == [], "nothing was queued"


def test_training_compile_is_a_job_setting(client, new_tenant):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    assert submit_job(client, headers, file_id)["training"]["compile"] == "auto"
    # Stored with the job: the worker builds the trainer's TrainConfig from job.training.
    assert submit_job(client, headers, file_id, compile=False)["training"]["compile"] == "off"
    error = error_of(client.post("/v1/jobs", headers=headers, json=job_body(file_id, compile="sometimes")), 422)
    assert [d.get("field") for d in error["details"]] == ["training.compile"]


def test_idempotency_key_returns_the_same_job(client, new_tenant):
    headers, other = new_tenant(), new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    other_file = upload(client, other, dataset()).json()["id"]
    keyed = {**headers, "Idempotency-Key": "submit-1"}

    first = client.post("/v1/jobs", headers=keyed, json=job_body(file_id))
    again = client.post("/v1/jobs", headers=keyed, json=job_body(file_id))
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/jobs", headers=headers).json()["data"]) == 1

    error = error_of(client.post("/v1/jobs", headers=keyed, json=job_body(file_id, max_steps=5)), 422)
    assert error["code"] == "idempotency_key_reused" and error["field"] == "Idempotency-Key"

    # Keys are per tenant.
    theirs = client.post("/v1/jobs", headers={**other, "Idempotency-Key": "submit-1"}, json=job_body(other_file))
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]


def test_concurrent_submissions_with_one_key_make_one_job(client, new_tenant):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    keyed = {**headers, "Idempotency-Key": "race"}
    results = []

    def post():
        results.append(client.post("/v1/jobs", headers=keyed, json=job_body(file_id)))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in results) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in results}) == 1


def test_cancel_a_queued_job(client, new_tenant):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    job = submit_job(client, headers, file_id)
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=headers).json()["data"]
    assert [e["kind"] for e in events] == ["created", "finished"] and events[-1]["data"] == {"status": "cancelled"}
    error = error_of(client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers), 409)
    assert error["code"] == "invalid_transition"


def test_cancel_a_running_job_sets_the_flag(client, new_tenant, app):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    job = submit_job(client, headers, file_id)
    with app.state.db.session() as session:
        assert states.claim(session, job["id"], "test-worker") == 1
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).json()
    assert response["status"] == "running" and response["cancel_requested"] is True
    kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job['id']}/events", headers=headers).json()["data"]]
    assert kinds == ["created", "started", "cancel_requested"]


def test_file_used_by_an_active_job_cannot_be_deleted(client, new_tenant):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    job = submit_job(client, headers, file_id)
    error = error_of(client.delete(f"/v1/files/{file_id}", headers=headers), 409)
    assert error["code"] == "file_in_use" and job["id"] in error["message"]
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert client.delete(f"/v1/files/{file_id}", headers=headers).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=headers).json()["status"] == "cancelled"


def test_active_job_limit_is_429(client, new_tenant, service_settings):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    for _ in range(service_settings.max_active_jobs_per_tenant):
        submit_job(client, headers, file_id)
    assert error_of(client.post("/v1/jobs", headers=headers, json=job_body(file_id)), 429)["code"] == "too_many_jobs"


# --- tenancy ------------------------------------------------------------------------------


def test_another_tenants_objects_are_404(client, new_tenant):
    owner, stranger = new_tenant(), new_tenant()
    file_id = upload(client, owner, dataset()).json()["id"]
    job_id = submit_job(client, owner, file_id)["id"]
    for method, path in [
        ("get", f"/v1/files/{file_id}"),
        ("delete", f"/v1/files/{file_id}"),
        ("get", f"/v1/jobs/{job_id}"),
        ("post", f"/v1/jobs/{job_id}/cancel"),
        ("get", f"/v1/jobs/{job_id}/events"),
        ("get", f"/v1/jobs/{job_id}/metrics"),
    ]:
        assert error_of(getattr(client, method)(path, headers=stranger), 404)["code"] == "not_found", path
    for path in ("/v1/files", "/v1/jobs", "/v1/adapters"):
        assert client.get(path, headers=stranger).json()["data"] == []
    assert client.get(f"/v1/jobs/{job_id}", headers=owner).json()["status"] == "queued", "untouched"
    assert error_of(client.get("/v1/adapters/ad-nothing", headers=stranger), 404)["code"] == "not_found"


def test_a_mixture_takes_tasks_from_record_labels_and_refuses_a_task_no_record_carries(client, new_tenant):
    import json

    headers = new_tenant()
    # HydraLoRA's example mixture labels records with "" (no task) and the integer 1.
    hydra = "".join(
        json.dumps({"instruction": f"q{i}", "input": "", "output": "a", "task_type": "" if i % 4 else 1}) + "\n" for i in range(16)
    )
    uploaded = upload(client, headers, hydra).json()
    assert uploaded["tasks"] == {"default": 12, "1": 4}
    other = upload(client, headers, dataset(6, task="1")).json()["id"]

    def body(*entries):
        return {**job_body(uploaded["id"]), "mixture": [dict(file_id=f, task=t) for f, t in entries]}

    created = client.post("/v1/jobs", headers=headers, json=body((uploaded["id"], "from_records")))
    assert created.status_code == 201, created.text
    assert client.post("/v1/jobs", headers=headers, json=body((uploaded["id"], "1"))).status_code == 201

    error = error_of(client.post("/v1/jobs", headers=headers, json=body((uploaded["id"], "qa"))), 422)
    assert error["field"] == "mixture[0].task" and "no record carries task 'qa'" in error["message"]
    error = error_of(client.post("/v1/jobs", headers=headers, json=body((uploaded["id"], "from_records"), (other, "from_records"))), 422)
    assert error["field"] == "mixture[1].task" and "also the task of mixture[0]" in error["message"]
