"""Text generation over trained adapters, in TGI's wire format (as LoRAX speaks it).

``POST /generate``         ``{"inputs", "parameters"}`` -> ``{"generated_text", "details"?}``
``POST /generate_stream``  the same request -> server-sent events, one per token; the last one
                           carries ``generated_text`` and (with ``details``) the details
``POST /``                 TGI's compatibility route: ``"stream": true`` -> the event stream,
                           else a JSON list of one /generate response

The adapter is ``parameters.adapter_id``: the id of one of the caller's adapters (another
tenant's, or an unknown or deleted one, is a 404). Without it the request runs on the base model
named by the ``default_base_model`` setting (TGI has no field to pick a base model).

Errors before generation starts use the service's error shape with their HTTP status (a 422
names the field, e.g. ``parameters.max_new_tokens``). An error after a stream has begun can no
longer change the status, so it is sent as TGI does: an event ``{"error", "error_type"}``.

A client that goes away cancels its request's work: the stream's generator is closed (which
cancels the engine request), and /generate watches for the disconnect while it waits.

The engine is this process's, or the `rlora engine` processes it forwards to
(`service.api.inference`); when none of those can be reached, the answer is a 503
``engine_unavailable`` saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlora.serve import (
    AdapterUnusable,
    AdapterTooLarge,
    EngineClosed,
    EngineOverloaded,
    GenerationParams,
    GenerationResult,
    GenerationValidationError,
    NonFiniteScores,
    RequestFailed,
)
from rlora.adapter.folder import AdapterMismatchError
from rlora.basemodels import UnknownBaseModel

from service.api.auth import TenantDep
from service.api.deps import SessionDep
from service.api.errors import APIError, invalid, not_found, reject_lone_surrogates
from service.ids import could_exist
from service.api.inference import Engine, Handle, get_engine
from service.engine.client import EngineUnavailable
from service.engine.streaming import RequestStreamResponse
from service.models import Adapter
from service.api.tgi import (
    CompatGenerateRequest,
    GenerateParameters,
    GenerateRequest,
    error_field,
    generate_response,
    sse,
    sse_error,
    stream_event,
)

log = logging.getLogger(__name__)

router = APIRouter(tags=["generate"])

# nginx's "client closed request": what a /generate whose client left "answers" (nobody reads it).
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class Target:
    """The adapter a request runs with (None: the default base model)."""

    adapter_id: str
    path: str
    base_model: str


# --- request preparation ---------------------------------------------------------------------


def _generation_params(body: GenerateRequest) -> GenerationParams:
    reject_lone_surrogates(body.inputs, "inputs")
    reject_lone_surrogates(body.parameters.model_dump(), "parameters")
    if not body.inputs:
        raise invalid("inputs", "Input validation error: `inputs` cannot be empty")
    try:
        return body.parameters.generation_params()
    except GenerationValidationError as err:
        raise invalid(error_field(err.field), str(err)) from None


def _looks_like_path_or_hub_id(adapter_id: str) -> bool:
    return "/" in adapter_id or "\\" in adapter_id or adapter_id.startswith((".", "~"))


def _lookup_adapter(session: Session, tenant_id: str, p: GenerateParameters) -> Target | None:
    # In LoRAX, adapter_source "local" makes adapter_id a filesystem path on the server and "hub"
    # a Hugging Face Hub repo it downloads. On a multi-tenant service neither may be honoured:
    # a path would let one tenant read (and probe for) any file the server can see, other
    # tenants' adapters included, and downloads would run arbitrary third-party weights. So every
    # source ("local", "hub" or null) means the same thing here: adapter_id is the id of one of
    # the caller's own adapters, looked up in the database scoped by tenant. A path or a hub
    # repo id is refused with a 422 that says so; anything else not found is a 404.
    source = p.adapter_source
    if source not in (None, "local", "hub"):
        raise invalid(
            "parameters.adapter_source",
            f"adapter_source {source!r} is not supported; set adapter_id to the id of one of your adapters (GET /v1/adapters)",
        )
    adapter_id = p.adapter_id
    if not adapter_id:
        return None  # null or "" (LoRAX's "no adapter"): the base model
    row = None
    if could_exist(adapter_id):
        row = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.id == adapter_id))
    if row is not None:
        return Target(adapter_id=row.id, path=row.path, base_model=row.base_model)
    if _looks_like_path_or_hub_id(adapter_id):
        raise invalid(
            "parameters.adapter_id",
            f"adapter_id {adapter_id!r} looks like a path or a hub repository; this server only serves adapters "
            "trained on it: set adapter_id to the id of one of your adapters (GET /v1/adapters)",
        )
    raise not_found("adapter", adapter_id)


def _resolve(session: Session, tenant_id: str, p: GenerateParameters) -> Target | None:
    try:
        return _lookup_adapter(session, tenant_id, p)
    finally:
        # Give the connection back now: a stream can last minutes, and neither a pooled
        # PostgreSQL connection nor an open SQLite read transaction should be held that long.
        session.close()


async def _prepare(body: GenerateRequest, tenant_id: str, session: Session) -> tuple[GenerationParams, Target | None]:
    params = _generation_params(body)
    target = await run_in_threadpool(_resolve, session, tenant_id, body.parameters)
    return params, target


async def _submit(engine: Engine, inputs: str, params: GenerationParams, target: Target | None, tenant_id: str) -> Handle:
    kwargs: dict[str, Any] = {"tenant": tenant_id}  # the engine's queues and caps are per tenant
    if target is not None:
        kwargs.update(adapter_id=target.adapter_id, adapter_path=target.path, base_model=target.base_model)
    try:
        return await engine.asubmit(inputs, params, **kwargs)
    except GenerationValidationError as err:
        raise invalid(error_field(err.field), str(err)) from None
    except AdapterMismatchError as err:
        raise APIError(422, "adapter_mismatch", str(err), field="parameters.adapter_id") from None
    except AdapterUnusable as err:
        raise APIError(422, "adapter_unusable", str(err), field="parameters.adapter_id") from None
    except AdapterTooLarge as err:
        raise APIError(503, "adapter_too_large", f"{err}; raise RLORA_ADAPTER_CACHE_BYTES") from None
    except FileNotFoundError:
        if target is None:
            raise  # a base model's files: the server's problem (500)
        # The row exists but its folder is gone (as GET /v1/adapters/{id}/download says).
        raise APIError(410, "adapter_files_missing", f"the files of adapter {target.adapter_id} are no longer on disk") from None
    except UnknownBaseModel as err:
        raise APIError(404, "not_found", str(err)) from None
    except EngineOverloaded as err:
        raise APIError(429, "too_many_requests", str(err), headers={"Retry-After": "1"}) from None
    except (EngineClosed, EngineUnavailable) as err:
        raise _engine_gone(err) from None


def _failed_alone(err: RequestFailed, target: Target | None) -> APIError:
    """A request that failed on its own after it was queued (the others went on)."""
    if isinstance(err, NonFiniteScores):
        return APIError(422, "adapter_unusable", str(err), field="parameters.adapter_id" if target else None)
    return APIError(503, "generation_failed", str(err), headers={"Retry-After": "1"})


def _engine_gone(err: EngineClosed | EngineUnavailable) -> APIError:
    if isinstance(err, EngineUnavailable):  # no engine process reachable, or it went away
        return APIError(503, "engine_unavailable", str(err), headers={"Retry-After": "1"})
    return APIError(503, "unavailable", "the inference engine is shutting down")


# --- /generate -------------------------------------------------------------------------------


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so the next ASGI message
    is ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _result_unless_client_gone(request: Request, handle: Handle) -> GenerationResult | None:
    """The request's result, or None when the client went away first (its work is cancelled)."""
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


def _generate_headers(result: GenerationResult) -> dict[str, str]:
    return {"x-prompt-tokens": str(result.prompt_tokens), "x-generated-tokens": str(result.generated_tokens)}


async def _generate(request: Request, body: GenerateRequest, tenant_id: str, session: Session, *, as_list: bool) -> Response:
    engine = get_engine(request.app)  # first: a process that serves no generation says so at once
    params, target = await _prepare(body, tenant_id, session)
    handle = await _submit(engine, body.inputs, params, target, tenant_id)
    try:
        result = await _result_unless_client_gone(request, handle)
    except (EngineClosed, EngineUnavailable) as err:
        raise _engine_gone(err) from None
    except RequestFailed as err:
        raise _failed_alone(err, target) from None
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    content = generate_response(result, details=params.details)
    return JSONResponse([content] if as_list else content, headers=_generate_headers(result))


# --- /generate_stream ------------------------------------------------------------------------


class EventStreamResponse(RequestStreamResponse):
    """Server-sent events of one engine request (cancelled however the response ends)."""

    media_type = "text/event-stream"

    def __init__(self, handle: Handle, details: bool):
        super().__init__(handle, _events(handle, details), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(handle: Handle, details: bool) -> AsyncIterator[bytes]:
    finished = False
    try:
        async with contextlib.aclosing(handle.stream()) as stream:
            async for event in stream:
                yield sse(stream_event(event, details=details))
                finished = event.final
    except (EngineClosed, EngineUnavailable, RequestFailed) as err:
        yield sse_error(str(err), "generation")
        return
    except Exception:  # noqa: BLE001 - the status is sent already: report it in the stream
        log.exception("generation failed after its stream began")
        yield sse_error("Request failed during generation", "generation")
        return
    if not finished:
        yield sse_error("Incomplete generation", "incomplete_generation")


async def _generate_stream(request: Request, body: GenerateRequest, tenant_id: str, session: Session) -> Response:
    engine = get_engine(request.app)  # first: a process that serves no generation says so at once
    params, target = await _prepare(body, tenant_id, session)
    handle = await _submit(engine, body.inputs, params, target, tenant_id)
    return EventStreamResponse(handle, params.details)


# --- routes ----------------------------------------------------------------------------------

_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "one `data: {json}` event per generated token"}
}


@router.post("/generate", response_class=JSONResponse)
async def generate(body: GenerateRequest, request: Request, tenant: TenantDep, session: SessionDep) -> Response:
    """TGI's /generate: ``{"generated_text"}``, plus ``details`` when asked for."""
    return await _generate(request, body, tenant.id, session, as_list=False)


@router.post("/generate_stream", response_class=StreamingResponse, responses=_STREAM_RESPONSES)
async def generate_stream(body: GenerateRequest, request: Request, tenant: TenantDep, session: SessionDep) -> Response:
    """TGI's /generate_stream: server-sent events, one per token."""
    return await _generate_stream(request, body, tenant.id, session)


@router.post("/", response_class=JSONResponse, responses=_STREAM_RESPONSES)
async def compat_generate(body: CompatGenerateRequest, request: Request, tenant: TenantDep, session: SessionDep) -> Response:
    """TGI's compatibility route: the event stream when ``stream`` is true, else a list of one
    /generate response."""
    if body.stream:
        return await _generate_stream(request, body, tenant.id, session)
    return await _generate(request, body, tenant.id, session, as_list=True)
