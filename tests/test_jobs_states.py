"""The job state machine (service.jobs.states) against the test database: every write to a
job is a compare-and-set on its status and, for a worker, on the attempt it holds."""

from __future__ import annotations

import threading

import pytest
from conftest_service import dataset, submit_job, upload
from sqlalchemy import select

from service.jobs import states
from service.jobs.states import InvalidTransition, Status
from service.models import Job, JobEvent


def queued_job(client, headers) -> str:
    return submit_job(client, headers, upload(client, headers, dataset()).json()["id"])["id"]


def test_concurrent_claims_exactly_one_wins(client, new_tenant, app):
    job_id = queued_job(client, new_tenant())
    barrier = threading.Barrier(4)
    results = []

    def claim(worker: str):
        with app.state.db.session() as session:
            barrier.wait()
            results.append(states.claim(session, job_id, worker))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results, key=lambda r: r is None) == [1, None, None, None]
    with app.state.db.session() as session:
        job = session.get(Job, job_id)
        assert job.status == Status.RUNNING and job.attempt == 1


def test_transitions_are_compare_and_set(client, new_tenant, app):
    headers = new_tenant()
    job_id = queued_job(client, headers)
    with app.state.db.session() as session:
        with pytest.raises(InvalidTransition):
            states.transition(session, job_id, Status.QUEUED, Status.SUCCEEDED)
        assert not states.transition(session, job_id, Status.RUNNING, Status.FAILED), "job is not running"
        attempt = states.claim(session, job_id, "w")
        assert not states.transition(session, job_id, Status.RUNNING, Status.SUCCEEDED, attempt=attempt + 1), "stale attempt"
        assert states.transition(session, job_id, Status.RUNNING, Status.QUEUED, attempt=attempt)
        assert states.claim(session, job_id, "w2") == attempt + 1
        assert states.transition(session, job_id, Status.RUNNING, Status.FAILED, attempt=attempt + 1, error_code="x", error_message="y")
        session.commit()
        job = session.get(Job, job_id, populate_existing=True)
        assert job.status == Status.FAILED and job.finished_at is not None
        with pytest.raises(InvalidTransition):
            states.cancel(session, job)
    error = client.get(f"/v1/jobs/{job_id}", headers=headers).json()["error"]
    assert error == {"code": "x", "message": "y"}


def test_a_worker_writes_to_a_running_job_only_while_it_holds_the_attempt(client, new_tenant, app):
    job_id = queued_job(client, new_tenant())
    with app.state.db.session() as session:
        job = session.get(Job, job_id)
        assert not states.touch_running(session, job, 1), "not running yet"
        attempt = states.claim(session, job_id, "w")
        assert states.touch_running(session, job, attempt, ("progress", {"step": 1}), step=1)
        assert states.run_state(session, job_id, attempt) == states.RunState(owned=True, cancel_requested=False)

        states.cancel(session, job)
        assert states.run_state(session, job_id, attempt) == states.RunState(owned=True, cancel_requested=True)
        assert states.requeue(session, job, attempt + 1, "test") is None, "not the attempt that holds the job"
        assert states.requeue(session, job, attempt, "test") == Status.CANCELLED
        assert states.run_state(session, job_id, attempt).owned is False
        assert not states.touch_running(session, job, attempt, ("progress", {"step": 2}), step=2), "the job moved on"
        assert not states.finish(session, job, attempt, Status.SUCCEEDED, {}), "a stale worker cannot end it again"

        job = session.get(Job, job_id, populate_existing=True)
        assert job.step == 1 and job.status == Status.CANCELLED
        kinds = list(session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        assert kinds == ["created", "started", "progress", "cancel_requested", "finished"]
