"""``/v1/models``: the base models and the caller's adapters (OpenAI's model objects)."""

from fastapi import APIRouter
from sqlalchemy import Connection

from service.api.auth import AuthenticatedTenant, TenantReaderDep
from service.api.catalog import ModelEntry, find_model, list_models
from service.api.deps import SettingsDep
from service.api.schemas import ModelOut, Page

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_out(entry: ModelEntry) -> ModelOut:
    parent = None if entry.base_model == entry.id else entry.base_model
    return ModelOut(id=entry.id, created=entry.created, owned_by=entry.owned_by, parent=parent)


@router.get("")
async def read_models(read_as_tenant: TenantReaderDep, settings: SettingsDep) -> Page[ModelOut]:
    def read(connection: Connection, tenant: AuthenticatedTenant) -> Page[ModelOut]:
        return Page(data=[model_out(entry) for entry in list_models(connection, settings, tenant.id)])

    return await read_as_tenant(read)


@router.get("/{model_id}")
async def read_model(model_id: str, read_as_tenant: TenantReaderDep, settings: SettingsDep) -> ModelOut:
    """A base model, or one of the caller's adapters (another tenant's: 404)."""

    def read(connection: Connection, tenant: AuthenticatedTenant) -> ModelOut:
        return model_out(find_model(connection, settings, tenant.id, model_id))

    return await read_as_tenant(read)
