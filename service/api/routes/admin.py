"""Operators' routes: any tenant's keys, created, listed, revoked and rotated (as ``rlora key``
does). Mounted only when ``RLORA_ADMIN_TOKEN`` is set (else they are 404s, like any unknown
path), and answering only requests that bear that token."""

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.auth import get_owned, require_admin
from service.api.deps import SessionDep, SessionRoute
from service.api.errors import not_found
from service.api.paging import PageDep, page
from service.api.routes.keys import rotated
from service.api.schemas import KeyCreate, KeyCreated, KeyOut, KeyRotate, Page
from service.keys import UnknownTenant, create_key, find_tenant, revoke_key
from service.models import ApiKey, Tenant

router = APIRouter(
    prefix="/v1/admin/tenants/{tenant}/keys", tags=["admin"], route_class=SessionRoute, dependencies=[Depends(require_admin)],
)


def _tenant(session: Session, tenant: str) -> Tenant:
    try:
        return find_tenant(session, tenant)
    except UnknownTenant:
        raise not_found("tenant", tenant) from None


def _key(session: Session, tenant: str, key_id: str) -> ApiKey:
    return get_owned(session, ApiKey, _tenant(session, tenant).id, key_id, "key")


@router.get("")
def list_tenant_keys(tenant: str, session: SessionDep, params: PageDep) -> Page[KeyOut]:
    """The tenant's keys (by id or name), newest first."""
    query = select(ApiKey.__table__).where(ApiKey.tenant_id == _tenant(session, tenant).id)
    rows, cursor = page(session, query, ApiKey.id, params)
    return Page(data=[KeyOut.model_validate(row) for row in rows], next_cursor=cursor)


@router.post("", status_code=201)
def create_tenant_key(tenant: str, session: SessionDep, body: KeyCreate | None = None) -> KeyCreated:
    body = body or KeyCreate()
    return KeyCreated.of(*create_key(session, _tenant(session, tenant).id, body.name, body.expires_at))


@router.delete("/{key_id}")
def revoke_tenant_key(tenant: str, key_id: str, session: SessionDep) -> KeyOut:
    return KeyOut.model_validate(revoke_key(session, _key(session, tenant, key_id)))


@router.post("/{key_id}/rotate", status_code=201)
def rotate_tenant_key(tenant: str, key_id: str, session: SessionDep, body: KeyRotate | None = None) -> KeyCreated:
    """A new key in place of ``key_id``, which is revoked at once or after ``grace_seconds``."""
    return rotated(session, _key(session, tenant, key_id), body)
