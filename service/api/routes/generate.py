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

import contextlib
import logging
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlora.serve import EngineClosed, GenerationParams, GenerationResult, GenerationValidationError, RequestFailed

from service.api.auth import TenantDep
from service.api.deps import SessionDep
from service.api.errors import APIError, invalid, not_found, reject_lone_surrogates
from service.api.generation import CLIENT_CLOSED_REQUEST, Fields, Target, result_unless_client_gone, submit, tenant_adapter
from service.api.inference import Handle, get_engine
from service.engine.client import EngineUnavailable
from service.engine.streaming import RequestStreamResponse
from service.api.tgi import (
    CompatGenerateRequest,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    TGIError,
    StreamResponse,
    error_content,
    error_field,
    generate_response,
    sse,
    sse_error,
    stream_event,
)

log = logging.getLogger(__name__)


class TGIRoute(APIRoute):
    """A route whose errors are in TGI's shape, ``{"error", "error_type"}``, as its clients parse them."""

    @staticmethod
    def render_error(err: APIError) -> JSONResponse:
        return JSONResponse(error_content(err.status, err.code, err.message, err.field), status_code=err.status, headers=err.headers)


router = APIRouter(tags=["generate"], route_class=TGIRoute)

FIELDS = Fields(parameter=error_field, adapter="parameters.adapter_id")


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
    target = tenant_adapter(session, tenant_id, adapter_id)
    if target is not None:
        return target
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


# --- /generate -------------------------------------------------------------------------------


def _generate_headers(result: GenerationResult) -> dict[str, str]:
    return {"x-prompt-tokens": str(result.prompt_tokens), "x-generated-tokens": str(result.generated_tokens)}


async def _generate(request: Request, body: GenerateRequest, tenant_id: str, session: Session, *, as_list: bool) -> Response:
    engine = get_engine(request.app)  # first: a process that serves no generation says so at once
    params, target = await _prepare(body, tenant_id, session)
    handle = await submit(engine, body.inputs, params, target, tenant_id, FIELDS)
    result = await result_unless_client_gone(request, handle, target, FIELDS)
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
    handle = await submit(engine, body.inputs, params, target, tenant_id, FIELDS)
    return EventStreamResponse(handle, params.details)


# --- routes ----------------------------------------------------------------------------------

def _event_schema(model: type) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


# Each event's schema (service.api.openapi adds these models to the document's components).
STREAM_EVENT_MODELS = (StreamResponse, TGIError)
_EVENTS = {"text/event-stream": {"schema": {"oneOf": [_event_schema(model) for model in STREAM_EVENT_MODELS]}}}
_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": _EVENTS, "description": "one `data: {json}` event per generated token; an error after the stream began: TGIError"}
}
_COMPAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": list[GenerateResponse], "content": _EVENTS, "description": "a list of one /generate response; with stream: true, the events of /generate_stream"},
}


@router.post("/generate", response_class=JSONResponse, responses={200: {"model": GenerateResponse}})
async def generate(body: GenerateRequest, request: Request, tenant: TenantDep, session: SessionDep) -> Response:
    """TGI's /generate: ``{"generated_text"}``, plus ``details`` when asked for."""
    return await _generate(request, body, tenant.id, session, as_list=False)


@router.post("/generate_stream", response_class=StreamingResponse, responses=_STREAM_RESPONSES)
async def generate_stream(body: GenerateRequest, request: Request, tenant: TenantDep, session: SessionDep) -> Response:
    """TGI's /generate_stream: server-sent events, one per token."""
    return await _generate_stream(request, body, tenant.id, session)


@router.post("/", response_class=JSONResponse, responses=_COMPAT_RESPONSES)
async def compat_generate(body: CompatGenerateRequest, request: Request, tenant: TenantDep, session: SessionDep) -> Response:
    """TGI's compatibility route: the event stream when ``stream`` is true, else a list of one
    /generate response."""
    if body.stream:
        return await _generate_stream(request, body, tenant.id, session)
    return await _generate(request, body, tenant.id, session, as_list=True)
