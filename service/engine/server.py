"""`rlora engine`: one `InferenceEngine` (one accelerator, its base models loaded once) behind a
small internal HTTP app that API processes forward generation to (`service.engine.client`).

    GET    /health                  the process answers (no token needed)
    GET    /info                    device, loaded base models, the engine's stats()
    GET    /metrics                 Prometheus: generation, adapter cache, base models (no token needed)
    POST   /generate                a request -> JSON lines, one per token (`protocol`)
    DELETE /adapters/{adapter_id}   drop a deleted adapter from the cache

A client that closes its stream cancels its request, as an HTTP client of the API does. With
``RLORA_ENGINE_TOKEN`` set, every route but /health needs it in the ``X-Rlora-Engine-Token``
header; the engine listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rlora.basemodels import UnknownBaseModel
from rlora.serve import InferenceEngine, RequestCancelled, RequestHandle

from service.engine.local import make_engine
from service.engine.protocol import MEDIA_TYPE, REFUSAL_STATUS, TOKEN_HEADER, error_json, error_line, event_line, refusal_status
from service.engine.streaming import RequestStreamResponse
from service.logs import REQUEST_ID_HEADER, log_context, request_id_from
from service.metrics import CONTENT_TYPE, EngineCollector, exposition, process_registry
from service.settings import Settings

log = logging.getLogger(__name__)

# On SIGTERM, the requests running get this long to finish; then their streams are cut (the API
# sends their clients an error event) and the engine closes, within systemd's stop timeout.
DRAIN_SECONDS = 20

_REFUSALS = tuple(REFUSAL_STATUS)


async def _event_lines(handle: RequestHandle, context: dict[str, Any]) -> AsyncIterator[bytes]:
    try:
        async with contextlib.aclosing(handle.stream()) as stream:
            async for event in stream:
                yield event_line(event)
    except Exception as err:  # noqa: BLE001 - the status is sent already: the last line says it
        if not isinstance(err, (*_REFUSALS, RequestCancelled)):
            # The response streams after the handler returned: its ids given, not bound.
            log.exception("generation failed after its stream began", extra=context)
        yield error_line(err)


def create_engine_app(engine: InferenceEngine, token: str | None = None) -> Starlette:
    """The internal app around ``engine``; it closes the engine when it shuts down."""

    def authorized(request: Request) -> bool:
        return token is None or hmac.compare_digest(request.headers.get(TOKEN_HEADER, "").encode(), token.encode())

    def unauthorized() -> JSONResponse:
        return JSONResponse({"error": {"type": "Unauthorized", "message": f"missing or wrong {TOKEN_HEADER}"}}, status_code=401)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    collectors = (process_registry(), EngineCollector(engine.stats))

    async def metrics(request: Request) -> Response:
        # Counts and timings only, no tenant's data: open to the scraper, as /health is.
        return Response(exposition(*collectors), media_type=CONTENT_TYPE)

    async def info(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        return JSONResponse({"device": str(engine.device), "base_models": engine.loaded_base_models(), "stats": engine.stats()})

    async def generate(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        try:
            body: dict[str, Any] = await request.json()
            inputs = body["inputs"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": {"type": "BadRequest", "message": "a JSON object with inputs"}}, status_code=400)
        tenant = str(body.get("tenant") or "")
        # The API's request id (service.engine.client) and the tenant, on this request's events.
        context = {"request_id": request_id_from(request.headers.get(REQUEST_ID_HEADER))} | ({"tenant_id": tenant} if tenant else {})
        with log_context(**context):
            try:
                handle = await engine.asubmit(
                    inputs, body.get("parameters"), adapter_id=body.get("adapter_id"),
                    adapter_path=body.get("adapter_path"), base_model=body.get("base_model"), tenant=tenant,
                )
            except _REFUSALS as err:
                return JSONResponse({"error": error_json(err)}, status_code=refusal_status(err))
        return RequestStreamResponse(handle, _event_lines(handle, context), media_type=MEDIA_TYPE)

    async def evict(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        return JSONResponse({"evicted": engine.evict(request.path_params["adapter_id"])})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close)  # its decode loops stop; requests still running end with EngineClosed

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/info", info),
            Route("/metrics", metrics),
            Route("/generate", generate, methods=["POST"]),
            Route("/adapters/{adapter_id}", evict, methods=["DELETE"]),
        ],
        lifespan=lifespan,
    )


def serve_engine(settings: Settings, *, host: str, port: int, device: str | None, base_models: Sequence[str]) -> int:
    """``rlora engine``: load ``base_models``, then serve until stopped (SIGTERM, Ctrl-C). Exit 2
    for an unknown base model."""
    import uvicorn

    engine = make_engine(settings, device)
    try:
        for name in base_models:
            engine.base_model(name)  # before the port opens: an engine that answers holds them
    except UnknownBaseModel as err:
        engine.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    if settings.engine_token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the engine listens on %s without RLORA_ENGINE_TOKEN: anyone who reaches it can generate", host)
    log.info("engine on %s, base models loaded: %s", engine.device, json.dumps(engine.loaded_base_models()))
    uvicorn.run(
        # Logging is the command's (service.logs): uvicorn's own set-up and access lines left out.
        create_engine_app(engine, settings.engine_token), host=host, port=port, log_config=None, access_log=False,
        timeout_graceful_shutdown=DRAIN_SECONDS,
    )
    return 0
