"""API keys checked from ``Authorization: Bearer`` (their life cycle: service.keys); the
admin token of the admin routes; tenant-scoped reads."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Connection, Row, Select, Table, bindparam, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.errors import APIError, not_found
from service.api.paging import PageParams, page
from service.api.schemas import Page
from service.db import Database
from service.ids import could_exist, hash_api_key
from service.keys import LAST_USED_RESOLUTION, KeyState, create_key, key_state
from service.logs import add_to_log_context
from service.models import ApiKey, Tenant, utcnow

log = logging.getLogger(__name__)


T = TypeVar("T")


class TenantExists(ValueError):
    pass


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """A new tenant and its first API key (the only time the key is seen in clear)."""
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise TenantExists(f"tenant {name!r} exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    _, key = create_key(session, tenant.id, name="initial")
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
    select(Tenant.id, Tenant.name, ApiKey.id.label("key_id"), ApiKey.expires_at, ApiKey.revoked_at, ApiKey.last_used_at)
    .join(ApiKey, ApiKey.tenant_id == Tenant.id)
    .where(ApiKey.key_hash == bindparam("key_hash"))
)
# Conditional, so that of the requests that found the mark stale at once, one writes it.
_MARK_USED = (
    update(ApiKey.__table__)
    .where(ApiKey.id == bindparam("key_id"), or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < bindparam("stale_before")))
    .values(last_used_at=bindparam("now"))
)


def _tenant_of_key(connection: Connection, key_hash: str) -> AuthenticatedTenant:
    row = connection.execute(_TENANT_OF_KEY, {"key_hash": key_hash}).first()
    if row is None:
        raise _unauthorized("invalid API key")
    now = utcnow()
    state = key_state(row.revoked_at, row.expires_at, now)
    if state is not KeyState.ACTIVE:
        raise _unauthorized(f"API key {row.key_id} is {state}")
    stale_before = now - LAST_USED_RESOLUTION
    stale = row.last_used_at is None or row.last_used_at < stale_before
    if stale and _marked_here.get(row.key_id, stale_before) <= stale_before:
        # A write at most once a LAST_USED_RESOLUTION per key (and per process), never one per
        # request; and only a mark: a database busy with other writers does not fail the request.
        _marked_here[row.key_id] = now
        try:
            connection.execute(_MARK_USED, {"key_id": row.key_id, "stale_before": stale_before, "now": now})
            connection.commit()
        except OperationalError as err:
            connection.rollback()
            log.info("API key %s: last use not recorded (%s)", row.key_id, err.orig)
    add_to_log_context(tenant_id=row.id)  # the request's events name their tenant from here on
    return AuthenticatedTenant(id=row.id, name=row.name)


# When this process last marked each key used (a bound on its writes, whatever the database says).
_marked_here: dict[str, datetime] = {}


# Declares the bearer scheme in the OpenAPI document (every route that needs a key says so, and
# /docs has its Authorize button); the header is read and checked by _bearer_hash, which says
# what is wrong with it.
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer", description="an API key; on /v1/admin, RLORA_ADMIN_TOKEN")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


def _bearer_hash(request: Request) -> str:
    """The sha256 of the request's bearer token (a key, or the admin token)."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("Authorization must be 'Bearer <key>'")
    return hash_api_key(key.strip())


async def require_admin(request: Request, _bearer: BearerDep) -> None:
    """The admin routes' check: the bearer token is RLORA_ADMIN_TOKEN (the routes are not
    mounted without one). Digests are compared, in constant time, whatever the lengths."""
    if not secrets.compare_digest(_bearer_hash(request), hash_api_key(request.app.state.settings.admin_token)):
        raise _unauthorized("not the admin token (RLORA_ADMIN_TOKEN)")


def _checked_tenant(db: Database, key_hash: str) -> AuthenticatedTenant:
    # Its own connection, given back before the request goes on: the request never holds one
    # while it waits for the next thread.
    with db.engine.connect() as connection:
        return _tenant_of_key(connection, key_hash)


async def current_tenant(request: Request, _bearer: BearerDep) -> AuthenticatedTenant:
    # Looked up on every request (one indexed query, no cache), so a revoked key stops at once.
    return await run_in_threadpool(_checked_tenant, request.app.state.db, _bearer_hash(request))


def _read_with_tenant(db: Database, key_hash: str, read: Callable[[Connection, AuthenticatedTenant], T]) -> T:
    # One checkout for the key and the read, given back in this thread.
    with db.engine.connect() as connection:
        return read(connection, _tenant_of_key(connection, key_hash))


def _read_with_tenant_retried(db: Database, key_hash: str, read: Callable[[Connection, AuthenticatedTenant], T]) -> T:
    try:
        return _read_with_tenant(db, key_hash, read)
    except DBAPIError as err:
        # A connection the database dropped (a restart) invalidates the pool; the read, having
        # written nothing, runs once more on a fresh connection.
        if not err.connection_invalidated:
            raise
    return _read_with_tenant(db, key_hash, read)


class TenantReader:
    """Runs a read for the request's tenant: ``await reader(read)`` calls ``read(connection,
    tenant)`` after the key lookup (every request, no cache), both in one thread hop on one
    pooled connection. The authorised reads are ``async def`` endpoints using it; as sync
    endpoints with ``TenantDep`` they cost three hops (the key, the endpoint, its response)."""

    def __init__(self, db: Database, key_hash: str):
        self._db = db
        self._key_hash = key_hash

    async def __call__(self, read: Callable[[Connection, AuthenticatedTenant], T]) -> T:
        return await run_in_threadpool(_read_with_tenant_retried, self._db, self._key_hash, read)


async def tenant_reader(request: Request, _bearer: BearerDep) -> TenantReader:
    # The header is checked here, first among the dependencies, as TenantDep checks it.
    return TenantReader(request.app.state.db, _bearer_hash(request))


TenantDep = Annotated[AuthenticatedTenant, Depends(current_tenant)]
TenantReaderDep = Annotated[TenantReader, Depends(tenant_reader)]


def where_owned(query: Select, table: Table) -> Select:
    """``query`` narrowed to the row of ``table`` with the bound ``object_id`` and ``tenant_id``.
    Build it once (building a statement per request costs more than running it)."""
    return query.where(table.c.tenant_id == bindparam("tenant_id"), table.c.id == bindparam("object_id"))


@cache
def _owned_objects(model: type) -> Select:
    return where_owned(select(model), model.__table__)


def _owned(execute: Callable[..., Any], query: Select, tenant_id: str, object_id: str, kind: str) -> Any:
    # Another tenant's object, like a missing one, is a 404 (never a 403, which would confirm
    # that the id exists).
    row = execute(query, {"tenant_id": tenant_id, "object_id": object_id}) if could_exist(object_id) else None
    if row is None:
        raise not_found(kind, object_id)
    return row


def get_owned(session: Session, model: type, tenant_id: str, object_id: str, kind: str):
    """The tenant's ``model`` object ``object_id`` (to change it in ``session``)."""
    return _owned(session.scalar, _owned_objects(model), tenant_id, object_id, kind)


def read_owned(connection: Connection | Session, query: Select, tenant_id: str, object_id: str, kind: str) -> Row:
    """The tenant's row ``object_id`` of ``query`` (made by ``where_owned``), to read."""
    return _owned(lambda statement, params: connection.execute(statement, params).first(), query, tenant_id, object_id, kind)


async def list_owned(read_as_tenant: TenantReader, model: type, schema: type[BaseModel], params: PageParams) -> Page:
    """A page of the tenant's ``model`` rows (newest first) as ``schema`` objects."""

    def read(connection: Connection, tenant: AuthenticatedTenant) -> Page:
        rows, cursor = page(connection, select(model.__table__).where(model.tenant_id == tenant.id), model.id, params)
        return Page(data=[schema.model_validate(row) for row in rows], next_cursor=cursor)

    return await read_as_tenant(read)

