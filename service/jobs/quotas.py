"""Per-tenant quotas on what a tenant keeps: stored bytes, files, adapters and jobs.

Usage is counted from the tables (and the adapter folders' sizes on disk), never kept as a
counter that could drift. A write that adds to it counts under the tenant's lock
(``scheduling.lock_tenant``) and inserts in the same transaction, so two concurrent requests
cannot both take the last unit of a quota.

A job is charged when it is submitted for the adapter it will make: its submission needs room
for one more adapter (counting those the tenant's queued and running jobs will make) and
stored bytes under the quota. An adapter's bytes are known only once it is written, so the last
job may take a tenant past the byte quota; what comes after is then refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from service.jobs import states
from service.models import Adapter, File, Job
from service.settings import Settings


@dataclass(frozen=True)
class Usage:
    """What a tenant keeps: dataset bytes plus adapter bytes, files, adapters, and jobs by status."""

    stored_bytes: int
    files: int
    adapters: int
    jobs_by_status: dict[str, int]

    @property
    def jobs(self) -> int:
        return sum(self.jobs_by_status.values())

    @property
    def active_jobs(self) -> int:
        return sum(self.jobs_by_status.get(status, 0) for status in states.ACTIVE)


class QuotaExceeded(Exception):
    """A request would take the tenant past a quota: its name, limit, the usage now, and what
    the request needs."""

    def __init__(self, quota: str, limit: int, usage: int, needs: str):
        self.quota = quota
        self.limit = limit
        self.usage = usage
        super().__init__(
            f"{quota} quota exceeded: {usage} of {limit} in use, and this request needs {needs}; "
            "delete some to make room"
        )


def folder_bytes(folder: str | os.PathLike) -> int:
    """The size of the files under ``folder`` (0 when it is gone)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(Path(root, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                pass  # removed meanwhile
    return total


def tenant_usage(connection: Connection | Session, tenant_id: str) -> Usage:
    """The tenant's usage now. Each tenant is charged its own files' bytes, though the same
    content uploaded by several tenants is stored once."""
    file_count, file_bytes = connection.execute(
        select(func.count(), func.coalesce(func.sum(File.bytes), 0)).where(File.tenant_id == tenant_id)
    ).one()
    adapter_paths = connection.scalars(select(Adapter.path).where(Adapter.tenant_id == tenant_id)).all()
    jobs_by_status = dict(
        connection.execute(select(Job.status, func.count()).where(Job.tenant_id == tenant_id).group_by(Job.status)).tuples().all()
    )
    return Usage(
        stored_bytes=int(file_bytes) + sum(folder_bytes(path) for path in adapter_paths),
        files=file_count,
        adapters=len(adapter_paths),
        jobs_by_status=jobs_by_status,
    )


def check_file_upload(session: Session, settings: Settings, tenant_id: str, size: int) -> None:
    """Room for one more file of ``size`` bytes, or ``QuotaExceeded``. Under the tenant's lock
    when the caller inserts the file next."""
    usage = tenant_usage(session, tenant_id)
    if usage.files + 1 > settings.quota_files:
        raise QuotaExceeded("files", settings.quota_files, usage.files, "1 more")
    if usage.stored_bytes + size > settings.quota_stored_bytes:
        raise QuotaExceeded("stored_bytes", settings.quota_stored_bytes, usage.stored_bytes, f"{size} more")


def check_job_submission(session: Session, settings: Settings, tenant_id: str) -> None:
    """Room for one more job and the adapter it will make, or ``QuotaExceeded``. Under the
    tenant's lock when the caller inserts the job next."""
    usage = tenant_usage(session, tenant_id)
    if usage.jobs + 1 > settings.quota_jobs:
        raise QuotaExceeded("jobs", settings.quota_jobs, usage.jobs, "1 more")
    # Adapters to come count: one for each job queued or running.
    adapters = usage.adapters + usage.active_jobs
    if adapters + 1 > settings.quota_adapters:
        raise QuotaExceeded("adapters", settings.quota_adapters, adapters, "1 more (adapters counted with those of the queued and running jobs)")
    # How much its adapter will take is known only once it is written.
    if usage.stored_bytes >= settings.quota_stored_bytes:
        raise QuotaExceeded("stored_bytes", settings.quota_stored_bytes, usage.stored_bytes, "room for its adapter")
