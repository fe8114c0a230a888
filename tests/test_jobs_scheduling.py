"""Choosing the next job (fair between tenants, under each tenant's running limit) and the
per-tenant active-job limit under concurrent submissions, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from conftest_service import dataset, job_body, upload
from queue_support import queue_client, queued_jobs, tenant_headers  # noqa: F401 - queue_client is a fixture

from service.jobs import scheduling, states
from service.jobs.states import Status


def queue_of(client) -> str:
    return f"{client.app.state.settings.queue_prefix}.cpu"


def claim_next(client, worker: str = "w"):
    with client.app.state.db.session() as session:
        claimed = scheduling.claim_next(session, queue_of(client), worker, client.app.state.settings.max_running_jobs_per_tenant)
    return None if claimed is None else claimed[0].id


def finish(client, job_id: str) -> None:
    with client.app.state.db.session() as session:
        job = session.get(states.Job, job_id)
        assert states.finish(session, job, job.attempt, Status.SUCCEEDED, {})


def test_a_second_tenant_starts_before_the_first_tenants_backlog(queue_client):
    a, b = tenant_headers(queue_client, "a"), tenant_headers(queue_client, "b")
    a_jobs = queued_jobs(queue_client, a, 30)
    (b_job,) = queued_jobs(queue_client, b, 1)

    assert claim_next(queue_client) == a_jobs[0]
    finish(queue_client, a_jobs[0])  # the worker frees up
    assert claim_next(queue_client) == b_job, "B has never been served: it goes before A's second job"
    assert claim_next(queue_client) == a_jobs[1]
    finish(queue_client, a_jobs[1])
    assert claim_next(queue_client) == a_jobs[2], "B has nothing queued; A's jobs go in submission order"


def test_a_tenant_at_its_running_limit_is_skipped_until_a_job_ends(queue_client):
    limit = queue_client.app.state.settings.max_running_jobs_per_tenant
    a = tenant_headers(queue_client, "a")
    a_jobs = queued_jobs(queue_client, a, limit + 2)
    assert [claim_next(queue_client) for _ in range(limit)] == a_jobs[:limit]
    assert claim_next(queue_client) is None, "A runs its limit; nothing else is queued"

    (b_job,) = queued_jobs(queue_client, tenant_headers(queue_client, "b"), 1)
    assert claim_next(queue_client) == b_job, "B is not held back by A's limit"
    finish(queue_client, a_jobs[0])
    assert claim_next(queue_client) == a_jobs[limit]


def test_concurrent_workers_claim_different_jobs_and_respect_the_limit(queue_client):
    limit = queue_client.app.state.settings.max_running_jobs_per_tenant
    queued_jobs(queue_client, tenant_headers(queue_client, "a"), limit + 3)
    barrier = threading.Barrier(limit + 3)

    def claim(worker: str):
        barrier.wait()
        return claim_next(queue_client, worker)

    with ThreadPoolExecutor(limit + 3) as pool:
        claimed = [job for job in pool.map(claim, [f"w{i}" for i in range(limit + 3)]) if job is not None]
    assert len(claimed) == len(set(claimed)) == limit


def test_concurrent_submissions_never_exceed_the_active_job_limit(queue_client, service_settings):
    limit = 5
    settings = queue_client.app.state.settings
    headers = tenant_headers(queue_client, "burst")
    file_id = upload(queue_client, headers, dataset()).json()["id"]
    barrier = threading.Barrier(30)

    def submit(_):
        barrier.wait()
        return queue_client.post("/v1/jobs", headers=headers, json=job_body(file_id)).status_code

    original = settings.max_active_jobs_per_tenant
    settings.max_active_jobs_per_tenant = limit
    try:
        with ThreadPoolExecutor(30) as pool:
            codes = list(pool.map(submit, range(30)))
    finally:
        settings.max_active_jobs_per_tenant = original
    assert sorted(codes) == [201] * limit + [429] * (30 - limit), codes
    listed = queue_client.get("/v1/jobs", headers=headers, params={"limit": 100}).json()["data"]
    assert len(listed) == limit


def test_a_job_asked_to_cancel_cannot_succeed(queue_client):
    (job_id,) = queued_jobs(queue_client, tenant_headers(queue_client), 1)
    assert claim_next(queue_client) == job_id
    with queue_client.app.state.db.session() as session:
        job = session.get(states.Job, job_id)
        assert states.cancel(session, job) == Status.RUNNING  # the answer while it evaluates
        assert not states.finish(session, job, job.attempt, Status.SUCCEEDED, {}), "the trainer finished after the cancel"
        assert states.finish(session, job, job.attempt, Status.CANCELLED, {})
        assert session.get(states.Job, job_id, populate_existing=True).status == Status.CANCELLED
