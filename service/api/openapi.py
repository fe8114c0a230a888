"""The OpenAPI document, completed with what FastAPI cannot infer: the schemas of server-sent
events (a stream has no response model), the largest page each ``limit`` may ask for (a
setting, not a constant); and without FastAPI's own 422 body, which no route answers with
(the OpenAI routes answer an invalid request with a 400)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from service.api.openai_schemas import ChatCompletionChunk
from service.api.routes.generate import STREAM_EVENT_MODELS
from service.settings import Settings

_REF = "#/components/schemas/{model}"


def _event_schemas() -> dict[str, Any]:
    models = [*STREAM_EVENT_MODELS, ChatCompletionChunk]
    _, schema = models_json_schema([(model, "serialization") for model in models], ref_template=_REF)
    return schema.get("$defs", {})


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """``app.openapi``: FastAPI's document, built once, plus the event schemas and limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes,
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in _event_schemas().items():
                schemas.setdefault(name, schema)
            for operation in (op for path in document["paths"].values() for op in path.values()):
                if "HTTPValidationError" in str(operation["responses"].get("422", "")):
                    del operation["responses"]["422"]
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "query" and parameter["name"] == "limit":
                        parameter["schema"]["maximum"] = settings.page_size_max
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
