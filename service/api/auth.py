"""API keys: created per tenant, stored as sha256, checked from ``Authorization: Bearer``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.errors import APIError, not_found
from service.db import Database
from service.ids import KEY_SHOWN_CHARS, could_exist, hash_api_key, new_api_key
from service.models import ApiKey, Tenant


class TenantExists(ValueError):
    pass


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """A new tenant and its first API key (the only time the key is seen in clear)."""
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise TenantExists(f"tenant {name!r} exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    key = new_api_key()
    session.add(ApiKey(tenant_id=tenant.id, prefix=key[:KEY_SHOWN_CHARS], key_hash=hash_api_key(key)))
    session.commit()
    return tenant, key


def _unauthorized(message: str) -> APIError:
    return APIError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class AuthenticatedTenant:
    """The tenant a request's key belongs to."""

    id: str
    name: str


# Built once: per request only the key's hash is bound (an indexed lookup, no ORM objects).
_TENANT_OF_KEY = (
    select(Tenant.id, Tenant.name).join(ApiKey, ApiKey.tenant_id == Tenant.id).where(ApiKey.key_hash == bindparam("key_hash"))
)


def _tenant_of_key(db: Database, key_hash: str) -> AuthenticatedTenant | None:
    # Its own connection, given back before the request goes on: the request never holds one
    # while it waits for the next thread.
    with db.engine.connect() as connection:
        row = connection.execute(_TENANT_OF_KEY, {"key_hash": key_hash}).first()
    return AuthenticatedTenant(id=row.id, name=row.name) if row else None


async def current_tenant(request: Request) -> AuthenticatedTenant:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("Authorization must be 'Bearer <key>'")
    # Looked up on every request (one indexed query, no cache), so a revoked key stops at once.
    tenant = await run_in_threadpool(_tenant_of_key, request.app.state.db, hash_api_key(key.strip()))
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant


TenantDep = Annotated[AuthenticatedTenant, Depends(current_tenant)]


@cache
def _owned_query(model: type):
    # One statement per model, built once: building one per request costs more than running it.
    return select(model).where(model.tenant_id == bindparam("tenant_id"), model.id == bindparam("object_id"))


def get_owned(session: Session, model: type, tenant_id: str, object_id: str, kind: str):
    """The tenant's ``model`` row ``object_id``; another tenant's, like a missing one, is a 404
    (never a 403, which would confirm that the id exists)."""
    row = None
    if could_exist(object_id):
        row = session.scalar(_owned_query(model), {"tenant_id": tenant_id, "object_id": object_id})
    if row is None:
        raise not_found(kind, object_id)
    return row
