"""The models a tenant can generate with, as one list (``/v1/models``, and the ``model`` of the
OpenAI inference routes): every base model, and the tenant's own adapters, named by their ids
(as LoRAX lists its adapters). Another tenant's adapter is not there: asking for it is a 404."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from rlora.basemodels import list_base_models, resolve_base_model

from service.api.errors import APIError
from service.api.generation import Target, tenant_adapter
from service.ids import could_exist
from service.models import Adapter
from service.settings import Settings

BASE_MODEL_OWNER = "system"  # OpenAI's owner of the models it serves to everyone


@dataclass(frozen=True)
class ModelEntry:
    id: str
    created: int  # Unix seconds
    owned_by: str
    base_model: str  # itself, for a base model


def model_not_found(model: str) -> APIError:
    return APIError(404, "model_not_found", f"The model {model!r} does not exist: it is neither a base model nor one of your adapters "
                    "(GET /v1/models lists them)", field="model")


def _base_model_entry(settings: Settings, name: str) -> ModelEntry:
    # When this server got the model: its config's time (tiny is built on first use, here).
    config = resolve_base_model(name, settings.models_dir, settings.cache_dir) / "config.json"
    return ModelEntry(id=name, created=int(config.stat().st_mtime), owned_by=BASE_MODEL_OWNER, base_model=name)


def _adapter_entry(row, tenant_id: str) -> ModelEntry:
    return ModelEntry(id=row.id, created=int(row.created_at.timestamp()), owned_by=tenant_id, base_model=row.base_model)


def list_models(connection: Connection, settings: Settings, tenant_id: str) -> list[ModelEntry]:
    """Base models first (by name), then the tenant's adapters, newest first."""
    entries = [_base_model_entry(settings, name) for name in list_base_models(settings.models_dir)]
    query = select(Adapter.id, Adapter.base_model, Adapter.created_at).where(Adapter.tenant_id == tenant_id).order_by(Adapter.id.desc())
    entries += [_adapter_entry(row, tenant_id) for row in connection.execute(query)]
    return entries


def find_model(connection: Connection, settings: Settings, tenant_id: str, model: str) -> ModelEntry:
    """The base model or tenant's adapter named ``model`` (404 ``model_not_found`` otherwise)."""
    if model in list_base_models(settings.models_dir):
        return _base_model_entry(settings, model)
    if could_exist(model):
        query = select(Adapter.id, Adapter.base_model, Adapter.created_at).where(Adapter.tenant_id == tenant_id, Adapter.id == model)
        row = connection.execute(query).first()
        if row is not None:
            return _adapter_entry(row, tenant_id)
    raise model_not_found(model)


def generation_target(session: Session, settings: Settings, tenant_id: str, model: str) -> Target:
    """What a request for ``model`` runs on (404 ``model_not_found`` when it names nothing)."""
    if model in list_base_models(settings.models_dir):
        return Target(base_model=model)
    target = tenant_adapter(session, tenant_id, model)
    if target is None:
        raise model_not_found(model)
    return target
