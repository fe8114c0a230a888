"""API keys with a life cycle: created, listed, revoked, rotated and expired, from the admin
routes, the tenants' own routes and ``rlora key``; refused (401) from the next request on."""

from __future__ import annotations

import logging
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from conftest_service import REPO, rlora_command, service_env

ADMIN_TOKEN = "admin-" + "x" * 40


@pytest.fixture(scope="module")
def admin_client(service_settings):
    """A client of an app with the admin routes on (the shared app has no admin token)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(service_settings.model_copy(update={"admin_token": ADMIN_TOKEN}), migrate=False)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def own_key(client, headers) -> tuple[str, dict]:
    """The id of the one key of ``headers``, and the key as listed."""
    (key,) = client.get("/v1/keys", headers=headers).json()["data"]
    return key["id"], key


def test_a_tenant_lists_its_own_keys_never_the_keys_themselves(client, new_tenant):
    alice, bob = new_tenant("alice"), new_tenant("bob")
    response = client.get("/v1/keys", headers=alice)
    assert response.status_code == 200
    (key,) = response.json()["data"]
    assert key["object"] == "api_key" and key["name"] == "initial" and key["status"] == "active"
    assert key_of(alice).startswith(key["prefix"]) and len(key["prefix"]) == 12
    assert key["revoked_at"] is None and key["expires_at"] is None and key["last_used_at"] is not None
    assert key_of(alice) not in response.text and "key_hash" not in response.text and "key" not in key
    assert [k["id"] for k in client.get("/v1/keys", headers=bob).json()["data"]] != [key["id"]]


def test_last_used_is_written_at_most_once_a_minute_per_key(client, new_tenant):
    alice = new_tenant("alice")
    _, first = own_key(client, alice)
    for _ in range(3):
        assert client.get("/v1/files", headers=alice).status_code == 200
    _, later = own_key(client, alice)
    assert later["last_used_at"] == first["last_used_at"]  # marked by the first request only


def test_a_revoked_key_is_refused_from_the_next_request_on(client, new_tenant):
    alice = new_tenant("alice")
    key_id, _ = own_key(client, alice)
    response = client.delete(f"/v1/keys/{key_id}", headers=alice)  # the key revokes itself
    assert response.status_code == 200 and response.json()["status"] == "revoked"
    refused = client.get("/v1/files", headers=alice)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


def test_a_tenant_cannot_revoke_or_see_another_tenants_key(client, new_tenant):
    alice, bob = new_tenant("alice"), new_tenant("bob")
    alice_key, _ = own_key(client, alice)
    assert client.delete(f"/v1/keys/{alice_key}", headers=bob).status_code == 404
    assert client.delete("/v1/keys/key-missing", headers=bob).status_code == 404
    assert alice_key not in client.get("/v1/keys", headers=bob).text
    assert client.get("/v1/files", headers=alice).status_code == 200


def test_the_admin_routes_are_off_without_an_admin_token(client, new_tenant):
    alice = new_tenant("alice")
    for method, path in (("GET", "/v1/admin/tenants/x/keys"), ("POST", "/v1/admin/tenants/x/keys")):
        assert client.request(method, path, headers=alice).status_code == 404
        assert client.request(method, path, headers=bearer(ADMIN_TOKEN)).status_code == 404


def test_an_admin_token_under_32_characters_is_refused():
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="admin_token"):
        Settings(admin_token="too-short")
    assert Settings(admin_token="").admin_token is None  # empty: unset, the routes off


def test_the_admin_routes_need_the_admin_token(admin_client, new_tenant):
    alice = new_tenant("alice")
    for headers in ({"Authorization": ""}, alice, bearer(ADMIN_TOKEN + "x"), bearer(ADMIN_TOKEN[:-1])):
        assert admin_client.get("/v1/admin/tenants/x/keys", headers=headers).status_code == 401


def test_admin_creates_lists_and_revokes_a_tenants_keys(admin_client, client, new_tenant):
    alice = new_tenant("alice")
    assert admin_client.get("/v1/admin/tenants/nobody/keys").status_code == 404
    alice_key, _ = own_key(client, alice)
    tenant_id, name = _tenant(client, alice)
    created = admin_client.post(f"/v1/admin/tenants/{name}/keys", json={"name": "ci"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith(body["prefix"]) and body["name"] == "ci" and body["status"] == "active"
    new_key = bearer(body["key"])
    assert client.get("/v1/files", headers=new_key).status_code == 200

    listed = admin_client.get(f"/v1/admin/tenants/{tenant_id}/keys").json()["data"]
    assert [k["id"] for k in listed] == [body["id"], alice_key]  # newest first
    assert body["key"] not in str(listed)

    revoked = admin_client.delete(f"/v1/admin/tenants/{name}/keys/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/v1/files", headers=new_key).status_code == 401
    assert client.get("/v1/files", headers=alice).status_code == 200  # the other key goes on

    bob = new_tenant("bob")
    bob_name = _tenant_name(client, bob)
    # One tenant's key is not found under another.
    assert admin_client.delete(f"/v1/admin/tenants/{bob_name}/keys/{alice_key}").status_code == 404


def test_an_expired_key_is_refused_at_once(admin_client, client, new_tenant):
    name = _tenant_name(client, new_tenant("alice"))
    soon = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    body = admin_client.post(f"/v1/admin/tenants/{name}/keys", json={"expires_at": soon.isoformat()}).json()
    assert body["status"] == "active" and client.get("/v1/files", headers=bearer(body["key"])).status_code == 200
    time.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.1)
    refused = client.get("/v1/files", headers=bearer(body["key"]))
    assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]
    (listed,) = [k for k in admin_client.get(f"/v1/admin/tenants/{name}/keys").json()["data"] if k["id"] == body["id"]]
    assert listed["status"] == "expired"


def test_keys_cannot_be_made_expired_or_with_a_grace_past_the_limit(admin_client, client, new_tenant):
    alice = new_tenant("alice")
    name = _tenant_name(client, alice)
    key_id, _ = own_key(client, alice)
    past = admin_client.post(f"/v1/admin/tenants/{name}/keys", json={"expires_at": "2000-01-01T00:00:00Z"})
    assert past.status_code == 422 and past.json()["error"]["field"] == "expires_at"
    naive = admin_client.post(f"/v1/admin/tenants/{name}/keys", json={"expires_at": "2999-01-01T00:00:00"})
    assert naive.status_code == 422
    too_long = admin_client.post(f"/v1/admin/tenants/{name}/keys/{key_id}/rotate", json={"grace_seconds": 31 * 86400})
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "grace_seconds"


def test_rotation_revokes_the_old_key_at_once_by_default(admin_client, client, new_tenant):
    alice = new_tenant("alice")
    name = _tenant_name(client, alice)
    key_id, _ = own_key(client, alice)
    rotated = admin_client.post(f"/v1/admin/tenants/{name}/keys/{key_id}/rotate")
    assert rotated.status_code == 201, rotated.text
    successor = rotated.json()
    assert successor["id"] != key_id and successor["name"] == "initial"
    assert client.get("/v1/files", headers=alice).status_code == 401
    assert client.get("/v1/files", headers=bearer(successor["key"])).status_code == 200
    again = admin_client.post(f"/v1/admin/tenants/{name}/keys/{key_id}/rotate")
    assert again.status_code == 409 and again.json()["error"]["code"] == "key_not_active"


def test_rotation_with_a_grace_period_keeps_the_old_key_until_it_ends(admin_client, client, new_tenant):
    alice = new_tenant("alice")
    name = _tenant_name(client, alice)
    key_id, _ = own_key(client, alice)
    before = datetime.now(timezone.utc)
    successor = admin_client.post(f"/v1/admin/tenants/{name}/keys/{key_id}/rotate", json={"grace_seconds": 3600}).json()
    assert client.get("/v1/files", headers=alice).status_code == 200  # both work during the grace
    assert client.get("/v1/files", headers=bearer(successor["key"])).status_code == 200
    (old,) = [k for k in admin_client.get(f"/v1/admin/tenants/{name}/keys").json()["data"] if k["id"] == key_id]
    ends = datetime.fromisoformat(old["expires_at"])
    assert old["revoked_at"] is None and timedelta(minutes=59) < ends - before < timedelta(minutes=61)


def test_no_key_reaches_the_logs(admin_client, client, new_tenant, caplog):
    caplog.set_level(logging.DEBUG)
    alice = new_tenant("alice")
    name = _tenant_name(client, alice)
    key_id, _ = own_key(client, alice)
    created = admin_client.post(f"/v1/admin/tenants/{name}/keys").json()["key"]
    rotated = admin_client.post(f"/v1/admin/tenants/{name}/keys/{key_id}/rotate").json()["key"]
    client.get("/v1/files", headers=bearer(created))
    client.get("/v1/files", headers=alice)  # refused: rotated
    for secret in (key_of(alice), created, rotated, ADMIN_TOKEN):
        assert secret not in caplog.text


def _tenant(client, headers) -> tuple[str, str]:
    """The id and the name of the tenant of ``headers`` (the admin routes take either)."""
    from sqlalchemy import select

    from service.ids import hash_api_key
    from service.models import ApiKey, Tenant

    with client.app.state.db.session() as session:
        query = select(Tenant.id, Tenant.name).join(ApiKey).where(ApiKey.key_hash == hash_api_key(key_of(headers)))
        return tuple(session.execute(query).one())


def _tenant_name(client, headers) -> str:
    return _tenant(client, headers)[1]


def rlora(home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(rlora_command(*args), cwd=REPO, env=service_env(home=home), capture_output=True, text=True, timeout=120)


def test_rlora_key_commands(tmp_path):
    home = tmp_path / "home"
    made = rlora(home, "tenant", "create", "alice")
    assert made.returncode == 0, made.stderr
    first = made.stdout.splitlines()[-1]

    created = rlora(home, "key", "create", "--tenant", "alice", "--name", "ci", "--expires-in", "90d")
    assert created.returncode == 0, created.stderr
    second = created.stdout.splitlines()[-1]
    assert second.startswith("rlk_") and second != first

    listed = rlora(home, "key", "list", "--tenant", "alice")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:4] == ["ID", "PREFIX", "NAME", "STATUS"] and len(rows) == 2
    assert [row.split()[2:4] for row in rows] == [["initial", "active"], ["ci", "active"]]
    second_id = rows[1].split()[0]

    rotated = rlora(home, "key", "rotate", "--tenant", "alice", second_id, "--grace", "1h")
    assert rotated.returncode == 0, rotated.stderr
    third = rotated.stdout.splitlines()[-1]
    assert third.startswith("rlk_") and third not in (first, second)
    revoked = rlora(home, "key", "revoke", "--tenant", "alice", second_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout

    listed = rlora(home, "key", "list", "--tenant", "alice")
    statuses = {row.split()[0]: row.split()[3] for row in listed.stdout.splitlines()[1:]}
    assert statuses[second_id] == "revoked" and sorted(statuses.values()) == ["active", "active", "revoked"]
    runs = (made, created, listed, rotated, revoked)
    for secret in (first, second, third):
        # Only the command that made a key shows it, on its last line; no log line has one.
        assert sum(secret in run.stdout for run in runs) == 1 and not any(secret in run.stderr for run in runs)

    assert rlora(home, "key", "revoke", "--tenant", "bob", second_id).returncode == 1  # no such tenant
    rlora(home, "tenant", "create", "bob")
    other = rlora(home, "key", "revoke", "--tenant", "bob", second_id)  # alice's key, not bob's
    assert other.returncode == 1 and "no key" in other.stderr
    dead = rlora(home, "key", "rotate", "--tenant", "alice", second_id)
    assert dead.returncode == 1 and "revoked" in dead.stderr
    assert rlora(home, "key", "create", "--tenant", "alice", "--expires-in", "soon").returncode == 2
    assert rlora(home, "key", "rotate", "--tenant", "alice", second_id, "--grace", "31d").returncode == 2
