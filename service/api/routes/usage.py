from fastapi import APIRouter
from sqlalchemy import Connection

from service.api.auth import AuthenticatedTenant, TenantReaderDep
from service.api.deps import SettingsDep
from service.api.schemas import QuotaUsage, UsageOut
from service.jobs.quotas import Usage, tenant_usage
from service.jobs.states import Status
from service.settings import Settings

router = APIRouter(prefix="/v1/usage", tags=["usage"])


def usage_out(usage: Usage, settings: Settings) -> UsageOut:
    return UsageOut(
        stored_bytes=QuotaUsage(used=usage.stored_bytes, limit=settings.quota_stored_bytes),
        files=QuotaUsage(used=usage.files, limit=settings.quota_files),
        adapters=QuotaUsage(used=usage.adapters, limit=settings.quota_adapters),
        jobs=QuotaUsage(used=usage.jobs, limit=settings.quota_jobs),
        jobs_by_status={status: usage.jobs_by_status.get(status, 0) for status in Status},
    )


@router.get("")
async def read_usage(read_as_tenant: TenantReaderDep, settings: SettingsDep) -> UsageOut:
    """The caller's stored bytes, files, adapters and jobs, each with its quota."""

    def read(connection: Connection, tenant: AuthenticatedTenant) -> UsageOut:
        return usage_out(tenant_usage(connection, tenant.id), settings)

    return await read_as_tenant(read)
