"""``GET /metrics``: Prometheus's text format (`service.metrics`). No key: it holds no tenant's
data (counts and timings, no ids), like /health; keep it off the public side of the load
balancer if its load figures are nobody else's business."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from rlora.serve import InferenceEngine
from service.api.inference import current_engine
from service.metrics import CONTENT_TYPE, EngineCollector, JobsCollector, exposition, process_registry

router = APIRouter(tags=["health"])


def install_metrics(app: FastAPI) -> None:
    """What this app's /metrics reports: its process's (or processes') metrics, the jobs in the
    database, and its in-process engine's cache and models when it has one (an engine process
    reports its own)."""

    def engine_stats() -> dict | None:
        engine = current_engine(app)
        return engine.stats() if isinstance(engine, InferenceEngine) else None

    app.state.metrics_sources = (process_registry(), JobsCollector(app.state.settings, app.state.db), EngineCollector(engine_stats))


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    # A sync endpoint: the job counts are database reads, in a thread.
    return Response(exposition(*request.app.state.metrics_sources), media_type=CONTENT_TYPE)
