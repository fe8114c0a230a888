"""A tenant's own API keys: listed (never the keys themselves) and revoked. Making and rotating
keys is the operator's (``rlora key``, or the admin routes)."""

from fastapi import APIRouter

from service.api.auth import TenantDep, TenantReaderDep, get_owned, list_owned
from service.api.deps import SessionDep, SessionRoute
from service.api.paging import PageDep
from service.api.schemas import KeyOut, Page
from service.keys import revoke_key
from service.models import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"], route_class=SessionRoute)


@router.get("")
async def list_keys(read_as_tenant: TenantReaderDep, params: PageDep) -> Page[KeyOut]:
    return await list_owned(read_as_tenant, ApiKey, KeyOut, params)


@router.delete("/{key_id}")
def revoke_own_key(key_id: str, tenant: TenantDep, session: SessionDep) -> KeyOut:
    """Refused from the next request on; the key this request was made with may be revoked too."""
    return KeyOut.model_validate(revoke_key(session, get_owned(session, ApiKey, tenant.id, key_id, "key")))
