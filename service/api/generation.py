"""One generation request through the process's engine, whatever wire format asked for it: the
caller's adapter looked up (tenant-scoped), the request submitted, its result awaited (a client
that leaves cancels it), and the engine's errors as `APIError`s naming the request's own fields.

The TGI routes (``routes/generate.py``) and the OpenAI routes (``routes/openai_inference.py``)
differ in their bodies only; both go through here, so they share the engine and its batching.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlora.adapter.folder import AdapterMismatchError
from rlora.basemodels import UnknownBaseModel
from rlora.serve import (
    AdapterTooLarge,
    AdapterUnusable,
    EngineClosed,
    EngineOverloaded,
    GenerationParams,
    GenerationResult,
    GenerationValidationError,
    NonFiniteScores,
    RequestFailed,
)

from service.api.errors import APIError, invalid
from service.api.inference import Engine, Handle
from service.engine.client import EngineUnavailable
from service.ids import could_exist
from service.models import Adapter

# nginx's "client closed request": what a request whose client left "answers" (nobody reads it).
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class Target:
    """What a request runs on: one of the caller's adapters, or a base model (``adapter_id`` None)."""

    base_model: str
    adapter_id: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class Fields:
    """The request's names for what the engine's errors are about: ``parameter`` maps a
    `GenerationParams` field (or ``inputs``) to the request's field, ``adapter`` is the field
    that chose the adapter."""

    parameter: Callable[[str], str]
    adapter: str


def tenant_adapter(session: Session, tenant_id: str, adapter_id: str) -> Target | None:
    """The tenant's adapter ``adapter_id`` (None: no such adapter, or another tenant's)."""
    if not could_exist(adapter_id):
        return None
    row = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.id == adapter_id))
    return None if row is None else Target(base_model=row.base_model, adapter_id=row.id, path=row.path)


async def submit(engine: Engine, inputs: str, params: GenerationParams, target: Target | None, tenant_id: str, fields: Fields) -> Handle:
    """The request queued on ``engine`` (``target`` None: the default base model)."""
    kwargs: dict[str, Any] = {"tenant": tenant_id}  # the engine's queues and caps are per tenant
    if target is not None:
        kwargs.update(adapter_id=target.adapter_id, adapter_path=target.path, base_model=target.base_model)
    try:
        return await engine.asubmit(inputs, params, **kwargs)
    except GenerationValidationError as err:
        raise invalid(fields.parameter(err.field), str(err)) from None
    except AdapterMismatchError as err:
        raise APIError(422, "adapter_mismatch", str(err), field=fields.adapter) from None
    except AdapterUnusable as err:
        raise APIError(422, "adapter_unusable", str(err), field=fields.adapter) from None
    except AdapterTooLarge as err:
        raise APIError(503, "adapter_too_large", f"{err}; raise RLORA_ADAPTER_CACHE_BYTES") from None
    except FileNotFoundError:
        if target is None or target.adapter_id is None:
            raise  # a base model's files: the server's problem (500)
        # The row exists but its folder is gone (as GET /v1/adapters/{id}/download says).
        raise APIError(410, "adapter_files_missing", f"the files of adapter {target.adapter_id} are no longer on disk") from None
    except UnknownBaseModel as err:
        raise APIError(404, "not_found", str(err)) from None
    except EngineOverloaded as err:
        raise APIError(429, "too_many_requests", str(err), headers={"Retry-After": "1"}) from None
    except (EngineClosed, EngineUnavailable) as err:
        raise engine_gone(err) from None


def failed_alone(err: RequestFailed, target: Target | None, fields: Fields) -> APIError:
    """A request that failed on its own after it was queued (the others went on)."""
    if isinstance(err, NonFiniteScores):
        adapter = target is not None and target.adapter_id is not None
        return APIError(422, "adapter_unusable", str(err), field=fields.adapter if adapter else None)
    return APIError(503, "generation_failed", str(err), headers={"Retry-After": "1"})


def engine_gone(err: EngineClosed | EngineUnavailable) -> APIError:
    if isinstance(err, EngineUnavailable):  # no engine process reachable, or it went away
        return APIError(503, "engine_unavailable", str(err), headers={"Retry-After": "1"})
    return APIError(503, "unavailable", "the inference engine is shutting down")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so the next ASGI message
    is ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _result_unless_client_gone(request: Request, handle: Handle) -> GenerationResult | None:
    result = asyncio.ensure_future(handle.aresult())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result.done():
            return result.result()
        return None
    finally:
        gone.cancel()
        if not result.done():
            handle.cancel()
            result.cancel()


async def result_unless_client_gone(request: Request, handle: Handle, target: Target | None, fields: Fields) -> GenerationResult | None:
    """The request's result, or None when the client went away first (its work is cancelled);
    its failures as `APIError`s."""
    try:
        return await _result_unless_client_gone(request, handle)
    except (EngineClosed, EngineUnavailable) as err:
        raise engine_gone(err) from None
    except RequestFailed as err:
        raise failed_alone(err, target, fields) from None
