"""One tenant cannot hurt another through what it keeps or sends: per-tenant quotas and their
usage report, adapter zips built once, and uploads checked in bounded memory."""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
import tracemalloc
import zipfile

import pytest
from fastapi.testclient import TestClient

from conftest_service import database_url, dataset, job_body, make_settings, submit_job, upload

QUOTAS = dict(quota_files=3, quota_stored_bytes=4000, quota_adapters=2, quota_jobs=3)


@pytest.fixture(scope="module")
def quota_app(backend, tmp_path_factory):
    from service.api.app import create_app

    home = tmp_path_factory.mktemp(f"quota-{backend}")
    with database_url(backend, home) as url:
        app = create_app(make_settings(home, url, **QUOTAS))
        with TestClient(app) as client:
            app.state.client = client
            yield app


@pytest.fixture
def client(quota_app):
    return quota_app.state.client


@pytest.fixture
def tenant(quota_app):
    from service.api.auth import create_tenant

    def make() -> dict[str, str]:
        with quota_app.state.db.session() as session:
            _, key = create_tenant(session, f"q-{secrets.token_hex(4)}")
        return {"Authorization": f"Bearer {key}"}

    return make


def quota_error(response, quota: str, limit: int, usage: int) -> str:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["details"] == [{"quota": quota, "limit": limit, "usage": usage}]
    assert quota in error["message"] and str(limit) in error["message"] and str(usage) in error["message"]
    return error["message"]


def make_adapter(app, job_id: str, size: int) -> str:
    """The job succeeded with an adapter folder of ``size`` bytes (no training): its id."""
    from service.models import Adapter, Job

    folder = app.state.settings.jobs_dir / job_id / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(secrets.token_bytes(size - 2))
    with app.state.db.session() as session:
        job = session.get(Job, job_id)
        job.status = "succeeded"
        adapter = Adapter(tenant_id=job.tenant_id, job_id=job_id, base_model="tiny", config={}, path=str(folder), metrics={})
        session.add(adapter)
        session.commit()
        return adapter.id


def usage(client, headers) -> dict:
    response = client.get("/v1/usage", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_usage_follows_uploads_jobs_adapters_and_deletes(client, tenant, quota_app):
    headers = tenant()
    empty = usage(client, headers)
    assert empty["object"] == "usage"
    assert {name: empty[name] for name in ("stored_bytes", "files", "adapters", "jobs")} == {
        "stored_bytes": {"used": 0, "limit": 4000}, "files": {"used": 0, "limit": 3},
        "adapters": {"used": 0, "limit": 2}, "jobs": {"used": 0, "limit": 3},
    }
    assert empty["jobs_by_status"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}

    first = upload(client, headers, dataset(10)).json()
    second = upload(client, headers, dataset(5, start=50)).json()
    job = submit_job(client, headers, first["id"])
    cancelled = submit_job(client, headers, first["id"])
    client.post(f"/v1/jobs/{cancelled['id']}/cancel", headers=headers)
    adapter_id = make_adapter(quota_app, job["id"], 1000)
    now = usage(client, headers)
    assert now["stored_bytes"]["used"] == first["bytes"] + second["bytes"] + 1000
    assert (now["files"]["used"], now["adapters"]["used"], now["jobs"]["used"]) == (2, 1, 2)
    assert now["jobs_by_status"] == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 1}

    assert client.delete(f"/v1/files/{second['id']}", headers=headers).status_code == 200
    assert client.delete(f"/v1/adapters/{adapter_id}", headers=headers).status_code == 200
    after = usage(client, headers)
    assert after["stored_bytes"]["used"] == first["bytes"]
    assert (after["files"]["used"], after["adapters"]["used"]) == (1, 0)


def test_file_quota_is_403_naming_it_and_leaves_other_tenants_alone(client, tenant):
    headers, other = tenant(), tenant()
    files = [upload(client, headers, dataset(3, start=10 * i)).json() for i in range(3)]
    quota_error(upload(client, headers, dataset(3, start=99)), "files", 3, 3)
    assert upload(client, other, dataset(3)).status_code == 201
    client.delete(f"/v1/files/{files[0]['id']}", headers=headers)
    assert upload(client, headers, dataset(3, start=99)).status_code == 201


def test_byte_quota_counts_files_and_adapters(client, tenant, quota_app):
    headers = tenant()
    data = dataset(40)  # about 1.3 kB
    file = upload(client, headers, data).json()
    job = submit_job(client, headers, file["id"])
    make_adapter(quota_app, job["id"], 2000)
    used = file["bytes"] + 2000
    message = quota_error(upload(client, headers, dataset(40, start=100)), "stored_bytes", 4000, used)
    assert f"{len(dataset(40, start=100))} more" in message
    # Full: no room for another job's adapter either.
    quota_error(upload(client, headers, dataset(40, start=100)), "stored_bytes", 4000, used)
    assert upload(client, headers, dataset(2)).status_code == 201  # what fits still does


def test_job_and_adapter_quotas(client, tenant):
    headers, other = tenant(), tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    first = submit_job(client, headers, file_id)
    second = submit_job(client, headers, file_id)
    # Two queued jobs will make the two adapters the quota allows.
    quota_error(client.post("/v1/jobs", headers=headers, json=job_body(file_id)), "adapters", 2, 2)
    client.post(f"/v1/jobs/{first['id']}/cancel", headers=headers)
    submit_job(client, headers, file_id)
    client.post(f"/v1/jobs/{second['id']}/cancel", headers=headers)
    quota_error(client.post("/v1/jobs", headers=headers, json=job_body(file_id)), "jobs", 3, 3)
    other_file = upload(client, other, dataset()).json()["id"]
    submit_job(client, other, other_file)


def test_concurrent_uploads_cannot_both_take_the_last_file(client, tenant):
    headers = tenant()
    results = []

    def post(index: int) -> None:
        results.append(upload(client, headers, dataset(3, start=100 * index)).status_code)

    threads = [threading.Thread(target=post, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [201, 201, 201, 403, 403, 403]
    assert usage(client, headers)["files"]["used"] == 3


def test_download_is_built_once_and_removed_with_the_adapter(client, tenant, quota_app):
    from service.api.archives import archive_path

    headers = tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    job = submit_job(client, headers, file_id)
    adapter_id = make_adapter(quota_app, job["id"], 500)
    first = client.get(f"/v1/adapters/{adapter_id}/download", headers=headers)
    assert first.status_code == 200 and first.headers["content-type"] == "application/zip"
    archive = archive_path(quota_app.state.settings.jobs_dir / job["id"] / "adapter")
    built = archive.stat()
    second = client.get(f"/v1/adapters/{adapter_id}/download", headers=headers)
    again = archive.stat()
    assert (again.st_ino, again.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)  # not rebuilt
    assert second.content == first.content
    names = zipfile.ZipFile(io.BytesIO(second.content)).namelist()
    assert names == [f"{adapter_id}/adapter_config.json", f"{adapter_id}/adapter_model.safetensors"]
    assert not list(quota_app.state.settings.tmp_dir.glob("adapter-*"))  # nothing left staged
    client.delete(f"/v1/adapters/{adapter_id}", headers=headers)
    assert not archive.exists()


def test_openapi_lists_the_usage_route(client):
    spec = client.get("/openapi.json").json()
    route = spec["paths"]["/v1/usage"]["get"]
    assert set(route["responses"]) >= {"200", "401"}
    assert "403" in spec["paths"]["/v1/files"]["post"]["responses"]


# --------------------------------------------------------------------------- bounded memory

UPLOAD_MEMORY_BOUND = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def large_upload_app(tmp_path_factory):
    from service.api.app import create_app

    home = tmp_path_factory.mktemp("large-uploads")
    with database_url("sqlite", home) as url:
        app = create_app(make_settings(home, url, max_upload_bytes=32 * 1024 * 1024))
        with TestClient(app) as client:
            app.state.client = client
            yield app


def many_small_records(total_bytes: int) -> bytes:
    record = json.dumps({"prompt": "1+1=", "completion": "2", "task": "add"})
    return ("[" + ",".join([record] * (total_bytes // (len(record) + 1))) + "]").encode()


@pytest.mark.parametrize(
    "content, expected",
    [
        (many_small_records(20 * 1024 * 1024), 201),  # before: every record kept, ~7x the upload
        (b"[" + b"{}," * 400_000 + b"{}]", 422),  # many tiny elements, each a problem
    ],
    ids=["20MB-of-small-records", "400k-tiny-elements"],
)
def test_a_large_array_upload_is_checked_in_bounded_memory_while_others_are_served(large_upload_app, content, expected):
    from service.api.auth import create_tenant

    client = large_upload_app.state.client
    with large_upload_app.state.db.session() as session:
        uploader = {"Authorization": f"Bearer {create_tenant(session, f'big-{secrets.token_hex(4)}')[1]}"}
        other = {"Authorization": f"Bearer {create_tenant(session, f'other-{secrets.token_hex(4)}')[1]}"}
    result = {}
    served_meanwhile = 0
    tracemalloc.start()
    try:
        thread = threading.Thread(target=lambda: result.update(response=upload(client, uploader, content, "big.json")))
        thread.start()
        while thread.is_alive():
            assert client.get("/v1/usage", headers=other).status_code == 200
            served_meanwhile += thread.is_alive()
            time.sleep(0.1)
        thread.join()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    response = result["response"]
    assert response.status_code == expected, response.text[:500]
    if expected == 201:
        assert response.json()["records"] > 300_000
    else:
        assert response.json()["error"]["details"][0] == {
            "line": 1, "element": 0, "field": None, "message": "unknown record shape: expected 'prompt' and 'completion', 'instruction' and 'output', or 'messages'",
        }
    # Python allocations of the whole process (the test client's copy of the body included)
    # while the upload was received and checked.
    print(f"peak {peak / 2**20:.1f} MiB of Python allocations; {served_meanwhile} requests of another tenant served meanwhile")
    assert peak < UPLOAD_MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB"
    assert served_meanwhile >= 1
