"""API keys: created per tenant, stored as sha256, checked from ``Authorization: Bearer``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import SessionDep
from service.api.errors import APIError, not_found
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


def current_tenant(request: Request, session: SessionDep) -> Tenant:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("Authorization must be 'Bearer <key>'")
    tenant = session.scalar(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id).where(ApiKey.key_hash == hash_api_key(key.strip()))
    )
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def get_owned(session: Session, model: type, tenant_id: str, object_id: str, kind: str):
    """The tenant's ``model`` row ``object_id``; another tenant's, like a missing one, is a 404
    (never a 403, which would confirm that the id exists)."""
    row = None
    if could_exist(object_id):
        row = session.scalar(select(model).where(model.tenant_id == tenant_id, model.id == object_id))
    if row is None:
        raise not_found(kind, object_id)
    return row
