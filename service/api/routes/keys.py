"""A tenant's own API keys: listed (never the keys themselves), revoked, and rotated (a lost or
leaked key replaced by a new one, with any of the tenant's working keys). Making a tenant's
first key, and keys beside the ones it has, is the operator's (``rlora key``, or the admin
routes)."""

from datetime import timedelta

from fastapi import APIRouter
from sqlalchemy.orm import Session

from service.api.auth import TenantDep, TenantReaderDep, get_owned, list_owned
from service.api.deps import SessionDep, SessionRoute
from service.api.errors import APIError
from service.api.paging import PageDep
from service.api.schemas import KeyCreated, KeyOut, KeyRotate, Page, error_responses
from service.keys import KeyNotActive, revoke_key, rotate_key
from service.models import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"], route_class=SessionRoute)


@router.get("")
async def list_keys(read_as_tenant: TenantReaderDep, params: PageDep) -> Page[KeyOut]:
    return await list_owned(read_as_tenant, ApiKey, KeyOut, params)


@router.delete("/{key_id}")
def revoke_own_key(key_id: str, tenant: TenantDep, session: SessionDep) -> KeyOut:
    """Refused from the next request on; the key this request was made with may be revoked too."""
    return KeyOut.model_validate(revoke_key(session, get_owned(session, ApiKey, tenant.id, key_id, "key")))


@router.post("/{key_id}/rotate", status_code=201, responses=error_responses(409))
def rotate_own_key(key_id: str, tenant: TenantDep, session: SessionDep, body: KeyRotate | None = None) -> KeyCreated:
    """A new key in place of ``key_id`` (its name kept), which is revoked at once or after
    ``grace_seconds``; the tenant's active keys stay as many. A revoked or expired key: 409."""
    return rotated(session, get_owned(session, ApiKey, tenant.id, key_id, "key"), body)


def rotated(session: Session, key: ApiKey, body: KeyRotate | None) -> KeyCreated:
    """``key`` rotated as ``body`` asks (a tenant's route and the operators' alike)."""
    body = body or KeyRotate()
    try:
        return KeyCreated.of(*rotate_key(session, key, timedelta(seconds=body.grace_seconds), body.expires_at))
    except KeyNotActive as err:
        raise APIError(409, "key_not_active", str(err)) from None
