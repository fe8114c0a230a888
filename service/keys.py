"""API keys' life cycle: issued to a tenant (named, with an optional expiry), listed, revoked
and rotated. A key is seen in clear once, when issued; only its sha256 and its first
characters (``prefix``, to recognise it in a list) are stored. Used by the ``rlora key``
commands and by the key routes alike."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.ids import KEY_SHOWN_CHARS, could_exist, hash_api_key, new_api_key
from service.models import ApiKey, Tenant, utcnow

# A key's last_used_at is written at most this often (by the request that finds it older), so
# that authenticating stays a read: "last used" is accurate to this much.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# The longest a rotated key may go on working beside its successor.
MAX_ROTATION_GRACE = timedelta(days=30)


class KeyState(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


def key_state(revoked_at: datetime | None, expires_at: datetime | None, now: datetime) -> KeyState:
    if revoked_at is not None:
        return KeyState.REVOKED
    if expires_at is not None and expires_at <= now:
        return KeyState.EXPIRED
    return KeyState.ACTIVE


class UnknownTenant(LookupError):
    pass


class UnknownKey(LookupError):
    pass


class KeyNotActive(ValueError):
    pass


def find_tenant(session: Session, id_or_name: str) -> Tenant:
    """The tenant with this id, else the one with this name."""
    if could_exist(id_or_name):
        tenant = session.get(Tenant, id_or_name) or session.scalar(select(Tenant).where(Tenant.name == id_or_name))
        if tenant is not None:
            return tenant
    raise UnknownTenant(f"no tenant {id_or_name!r}")


def create_key(session: Session, tenant_id: str, name: str | None = None, expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """A new key of the tenant, committed with whatever else ``session`` holds, and the key itself."""
    key = new_api_key()
    row = ApiKey(tenant_id=tenant_id, prefix=key[:KEY_SHOWN_CHARS], key_hash=hash_api_key(key), name=name, expires_at=expires_at)
    session.add(row)
    session.commit()
    return row, key


def tenant_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """Every key of the tenant, oldest first."""
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id)))


def tenant_key(session: Session, tenant_id: str, key_id: str) -> ApiKey:
    """The tenant's key ``key_id``; another tenant's is unknown, like a missing one."""
    key = session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.id == key_id)) if could_exist(key_id) else None
    if key is None:
        raise UnknownKey(f"the tenant has no key {key_id!r}")
    return key


def revoke_key(session: Session, key: ApiKey) -> ApiKey:
    """Refused from the next request on (keys are checked on every request, not cached).
    Revoking a revoked key keeps its first revocation time."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key


def rotate_key(session: Session, key: ApiKey, grace: timedelta, expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """A new key with ``key``'s name, expiring at ``expires_at``; ``key`` is revoked at once
    (``grace`` zero) or expires ``grace`` from now (or when it was to expire, if sooner), for
    clients to change over. A revoked or expired key is not rotated: that would revive it."""
    now = utcnow()
    state = key_state(key.revoked_at, key.expires_at, now)
    if state is not KeyState.ACTIVE:
        raise KeyNotActive(f"key {key.id} is {state}; create a new key instead")
    change = {"revoked_at": now} if grace <= timedelta(0) else {"expires_at": min(key.expires_at or now + grace, now + grace)}
    # Compare-and-set on what was read: of two rotations at once, one makes the successor.
    changed = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None), ApiKey.expires_at.is_not_distinct_from(key.expires_at))
        .values(**change)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not changed:
        session.rollback()
        raise KeyNotActive(f"key {key.id} was changed meanwhile (revoked or rotated); list the keys again")
    session.expire(key)
    return create_key(session, key.tenant_id, key.name, expires_at)  # one commit: both keys change together
