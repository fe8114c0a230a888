"""A job's events as a server-sent event stream: what ``GET /v1/jobs/{id}/events`` pages
through, pushed as it is written, until the job has ended and every event was sent.

The stream holds no thread and no connection between polls: each poll is one authorised
read (the key is looked up again, so a revoked key ends the stream) of the events after the
last one sent and of the job's status. Each event is ``id: <event id>``, ``event: <kind>``,
``data: <the event as GET .../events returns it>``; a client that reconnects with
``Last-Event-ID`` (browsers' EventSource does) goes on after that event. A comment line is
sent while nothing happens, so proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from sqlalchemy import Connection, select

from service.api.auth import AuthenticatedTenant, TenantReader
from service.api.errors import APIError
from service.api.schemas import JobEventOut
from service.jobs.states import TERMINAL
from service.models import Job, JobEvent

POLL_SECONDS = 1.0
KEEPALIVE_SECONDS = 15.0
BATCH = 100  # events read per poll


def _frame(event: JobEventOut) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"


def _events_after(job_id: str, after: int):
    def read(connection: Connection, tenant: AuthenticatedTenant) -> tuple[list[JobEventOut], bool]:
        status = connection.execute(select(Job.status).where(Job.tenant_id == tenant.id, Job.id == job_id)).scalar()
        rows = connection.execute(
            select(JobEvent.__table__)
            .where(JobEvent.tenant_id == tenant.id, JobEvent.job_id == job_id, JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(BATCH)
        )
        # Ended is read before the events: an event written after the last status change is
        # still in this read, so nothing is missed when the stream stops.
        return [JobEventOut.model_validate(row) for row in rows], status is None or status in TERMINAL

    return read


async def job_event_stream(read_as_tenant: TenantReader, job_id: str, after: int) -> AsyncIterator[str]:
    """The frames of ``job_id``'s events after event ``after``; ends once the job has ended
    and its last event was sent (or with an ``error`` event if the key stops working)."""
    quiet_since = time.monotonic()
    while True:
        try:
            events, ended = await read_as_tenant(_events_after(job_id, after))
        except APIError as err:
            yield f"event: error\ndata: {json.dumps({'error': {'code': err.code, 'message': err.message}})}\n\n"
            return
        for event in events:
            yield _frame(event)
            after = event.id
        if ended and len(events) < BATCH:
            return
        if events:
            quiet_since = time.monotonic()
            if len(events) == BATCH:
                continue  # more are waiting
        elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_SECONDS)
