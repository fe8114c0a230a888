import shutil
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.archives import adapter_archive, remove_adapter_archive
from service.api.auth import TenantDep, TenantReaderDep, get_owned, list_owned, read_owned, where_owned
from service.api.deps import SessionDep, SessionRoute, SettingsDep
from service.api.errors import APIError
from service.api.inference import evict_adapter
from service.models import Adapter
from service.api.paging import PageDep
from service.api.schemas import AdapterOut, Deleted, Page

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], route_class=SessionRoute)


_OWNED_ADAPTER_ROWS = where_owned(select(Adapter.__table__), Adapter.__table__)


def get_adapter(session: Session, tenant_id: str, adapter_id: str) -> Adapter:
    return get_owned(session, Adapter, tenant_id, adapter_id, "adapter")


@router.get("")
async def list_adapters(read_as_tenant: TenantReaderDep, params: PageDep) -> Page[AdapterOut]:
    return await list_owned(read_as_tenant, Adapter, AdapterOut, params)


@router.get("/{adapter_id}")
async def read_adapter(adapter_id: str, read_as_tenant: TenantReaderDep) -> AdapterOut:
    return await read_as_tenant(
        lambda connection, tenant: AdapterOut.model_validate(read_owned(connection, _OWNED_ADAPTER_ROWS, tenant.id, adapter_id, "adapter"))
    )


@router.get("/{adapter_id}/download", response_class=FileResponse)
def download_adapter(adapter_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """The adapter folder as a zip: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    adapter = get_adapter(session, tenant.id, adapter_id)
    folder = Path(adapter.path)
    session.close()  # the connection back to the pool before the first download's zip, which may take a while
    try:
        archive = adapter_archive(settings, adapter_id, folder)
    except FileNotFoundError:
        raise APIError(410, "adapter_files_missing", f"the files of adapter {adapter_id} are no longer on disk") from None
    return FileResponse(archive, media_type="application/zip", filename=f"{adapter_id}.zip")


@router.delete("/{adapter_id}")
def delete_adapter(adapter_id: str, request: Request, tenant: TenantDep, session: SessionDep) -> Deleted:
    adapter = get_adapter(session, tenant.id, adapter_id)
    folder = adapter.path
    session.delete(adapter)
    session.commit()
    # Out of the inference cache too (requests already running finish with it); /generate looks
    # the id up in the database first, so from now on it is a 404 there.
    evict_adapter(request.app, adapter_id)
    shutil.rmtree(folder, ignore_errors=True)
    remove_adapter_archive(Path(folder))
    return Deleted(id=adapter_id, object="adapter")
