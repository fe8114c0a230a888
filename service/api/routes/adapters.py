import os
import shutil
import zipfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from service.api.auth import TenantDep, TenantReaderDep, get_owned, list_owned, read_owned, where_owned
from service.api.deps import SessionDep, SessionRoute, SettingsDep
from service.api.errors import APIError
from service.api.inference import evict_adapter
from service.api.staging import staging_file
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
    if not folder.is_dir():
        raise APIError(410, "adapter_files_missing", f"the files of adapter {adapter_id} are no longer on disk")
    session.close()  # the connection back to the pool before the zip, which may take a while
    fd, zip_path = staging_file(settings, "adapter-", ".zip")
    os.close(fd)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{adapter_id}/{path.relative_to(folder)}")
    return FileResponse(
        zip_path, media_type="application/zip", filename=f"{adapter_id}.zip", background=BackgroundTask(os.unlink, zip_path)
    )


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
    return Deleted(id=adapter_id, object="adapter")
