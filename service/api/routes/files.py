from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlora.data.records import DatasetValidationError, check_dataset

from service.api.auth import TenantDep, TenantReaderDep, get_owned, list_owned, read_owned, where_owned
from service.api.deps import SessionDep, SessionRoute, SettingsDep, closing_sessions
from service.api.errors import APIError
from service.jobs import quotas
from service.jobs.scheduling import lock_tenant
from service.jobs.states import active_jobs_using_file
from service.models import File
from service.api.paging import PageDep
from service.api.schemas import Deleted, FileOut, Page
from service.settings import Settings
from service.jobs.storage import remove_blob_if_unused, store_blob
from service.api.uploads import FIELD, PURPOSE_FIELD, Upload, receive_upload

router = APIRouter(prefix="/v1/files", tags=["files"], route_class=SessionRoute)


_OWNED_FILE_ROWS = where_owned(select(File.__table__), File.__table__)


def get_file(session: Session, tenant_id: str, file_id: str) -> File:
    return get_owned(session, File, tenant_id, file_id, "file")


@closing_sessions  # in this thread: the request must not hold the connection on its way out
def _validate_and_store(*, session: Session, settings: Settings, tenant_id: str, upload: Upload) -> File:
    # Refused before the validation when there is no room already; the connection goes back
    # to the pool while it runs.
    quotas.check_file_upload(session, settings, tenant_id, upload.size)
    session.rollback()
    try:
        # Streamed from the staged file in this thread: memory follows the largest record.
        summary = check_dataset(
            upload.path, max_record_chars=settings.max_record_chars, max_record_messages=settings.max_record_messages
        )
    except DatasetValidationError as err:
        details = [{"line": e.line, "element": e.element, "field": e.field, "message": e.message} for e in err.errors]
        plural = "" if err.total == 1 else "s"
        raise APIError(
            422, "invalid_dataset", f"invalid dataset: {err.total} problem{plural}; first: {err.errors[0]}", field=FIELD, details=details
        ) from None
    # Counted again and inserted under the tenant's lock: concurrent uploads cannot both take
    # the last of a quota.
    lock_tenant(session, tenant_id)
    quotas.check_file_upload(session, settings, tenant_id, upload.size)
    store_blob(settings, upload.path, upload.sha256)
    file = File(
        tenant_id=tenant_id,
        filename=upload.filename,
        sha256=upload.sha256,
        bytes=upload.size,
        format=summary.format,
        records=summary.records,
        tasks=dict(summary.tasks),
        shapes=dict(summary.shapes),
    )
    session.add(file)
    session.commit()
    return file


# The body is streamed by hand (for the size limit), so describe it to OpenAPI explicitly.
_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {"type": "string", "format": "binary", "description": "JSONL or a JSON array"},
                        PURPOSE_FIELD: {"type": "string", "enum": ["fine-tune"], "description": "optional (OpenAI's files API sends it)"},
                    },
                }
            }
        },
    }
}


@router.post("", status_code=201, openapi_extra=_MULTIPART_BODY)
async def upload_file(request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> FileOut:
    upload = await receive_upload(request, settings)
    try:
        if upload.purpose not in (None, "fine-tune"):
            raise APIError(
                422, "invalid_request", f"purpose: {upload.purpose!r} is not supported; files here are datasets, purpose 'fine-tune'",
                field=PURPOSE_FIELD,
            )
        file = await run_in_threadpool(_validate_and_store, session=session, settings=settings, tenant_id=tenant.id, upload=upload)
    finally:
        upload.path.unlink(missing_ok=True)
    return FileOut.model_validate(file)


@router.get("")
async def list_files(read_as_tenant: TenantReaderDep, params: PageDep) -> Page[FileOut]:
    return await list_owned(read_as_tenant, File, FileOut, params)


@router.get("/{file_id}")
async def read_file(file_id: str, read_as_tenant: TenantReaderDep) -> FileOut:
    return await read_as_tenant(
        lambda connection, tenant: FileOut.model_validate(read_owned(connection, _OWNED_FILE_ROWS, tenant.id, file_id, "file"))
    )


@router.delete("/{file_id}")
def delete_file(file_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> Deleted:
    file = get_file(session, tenant.id, file_id)
    in_use = active_jobs_using_file(session, tenant.id, file_id)
    if in_use:
        raise APIError(
            409, "file_in_use", f"file {file_id} is used by active job(s) {', '.join(in_use)}; cancel them or wait",
            details=[{"job_id": job_id} for job_id in in_use],
        )
    sha = file.sha256
    session.delete(file)
    session.commit()
    remove_blob_if_unused(session, settings, sha)
    return Deleted(id=file_id, object="file")
