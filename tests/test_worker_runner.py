"""The reconciler and the job runner in-process, against SQLite and PostgreSQL.

The broker is the embedded (filesystem) one; no worker consumes it, so the tokens sent can be
counted in its folder. Each test has queues of its own (queue_support.queue_client).
"""

from __future__ import annotations

import shutil
import threading
from datetime import timedelta

from conftest_service import dataset, submit_job, upload
from queue_support import queue_client, queued_jobs, tenant_headers, tokens  # noqa: F401 - queue_client is a fixture
from sqlalchemy import update

from service.jobs import states
from service.jobs.reconciler import reconcile, top_up
from service.jobs.states import Status
from service.jobs.storage import blob_path
from service.models import Job, utcnow


def set_job(client, job_id: str, **values) -> None:
    with client.app.state.db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def kinds(client, headers, job_id) -> list[str]:
    return [e["kind"] for e in client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["data"]]


def reconcile_once(client) -> dict[str, int]:
    state = client.app.state
    return reconcile(state.settings, state.db, state.celery)


def test_a_running_job_with_a_stale_heartbeat_is_queued_again_with_a_token(queue_client):
    headers = tenant_headers(queue_client)
    (job_id,) = queued_jobs(queue_client, headers, 1)
    with queue_client.app.state.db.session() as session:
        attempt = states.claim(session, job_id, "lost-worker")
    shutil.rmtree(queue_client.app.state.settings.broker_dir / "messages")  # the token was taken
    (queue_client.app.state.settings.broker_dir / "messages").mkdir()
    assert reconcile_once(queue_client) == {"requeued": 0, "cancelled": 0, "failed": 0, "sent": 0}, "heartbeat is fresh"

    timeout = queue_client.app.state.settings.heartbeat_timeout
    set_job(queue_client, job_id, heartbeat_at=utcnow() - timedelta(seconds=timeout + 1))
    assert reconcile_once(queue_client) == {"requeued": 1, "cancelled": 0, "failed": 0, "sent": 1}
    job = queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "queued" and job["attempt"] == attempt
    assert kinds(queue_client, headers, job_id)[-1] == "requeued"
    assert tokens(queue_client) == 1
    with queue_client.app.state.db.session() as session:
        assert states.claim(session, job_id, "next-worker") == attempt + 1


def test_a_lost_job_that_was_being_cancelled_ends_cancelled(queue_client):
    headers = tenant_headers(queue_client)
    (job_id,) = queued_jobs(queue_client, headers, 1)
    with queue_client.app.state.db.session() as session:
        states.claim(session, job_id, "lost-worker")
    queue_client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    set_job(queue_client, job_id, heartbeat_at=utcnow() - timedelta(hours=1))
    assert reconcile_once(queue_client)["cancelled"] == 1
    assert queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "cancelled"


def test_lost_tokens_are_sent_again_and_never_doubled(queue_client):
    for label in ("a", "b"):  # two jobs each, within the running limit: 4 jobs can start
        queued_jobs(queue_client, tenant_headers(queue_client, label), 2)
    assert tokens(queue_client) == 4, "one token per submission"
    state = queue_client.app.state

    # Several reconcilers at once, and again and again: a healthy queue gets nothing more.
    threads = [threading.Thread(target=top_up, args=(state.settings, state.db, state.celery)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _ in range(3):
        reconcile_once(queue_client)
    assert tokens(queue_client) == 4

    for path in list((state.settings.broker_dir / "messages").iterdir())[:3]:
        path.unlink()  # lost with a broker's restart
    assert reconcile_once(queue_client)["sent"] == 3
    assert reconcile_once(queue_client)["sent"] == 0
    assert tokens(queue_client) == 4


def test_tokens_follow_the_running_limit(queue_client):
    state = queue_client.app.state
    limit = state.settings.max_running_jobs_per_tenant
    shutil.rmtree(state.settings.broker_dir / "messages")
    (state.settings.broker_dir / "messages").mkdir()
    job_ids = queued_jobs(queue_client, tenant_headers(queue_client), limit + 3)
    for path in (state.settings.broker_dir / "messages").iterdir():
        path.unlink()
    with state.db.session() as session:
        for job_id in job_ids[:limit]:
            states.claim(session, job_id, "w")
    assert reconcile_once(queue_client)["sent"] == 0, "the tenant runs its limit: none of its jobs can start"
    with state.db.session() as session:
        job = session.get(Job, job_ids[0])
        states.finish(session, job, job.attempt, Status.SUCCEEDED, {})
    assert reconcile_once(queue_client)["sent"] == 1


def test_a_job_whose_file_vanished_fails_with_a_readable_error(queue_client):
    from worker.runner import run_next

    state = queue_client.app.state
    headers = tenant_headers(queue_client)
    file_id = upload(queue_client, headers, dataset(5, start=70_000)).json()["id"]
    job_id = submit_job(queue_client, headers, file_id)["id"]
    sha = queue_client.get(f"/v1/files/{file_id}", headers=headers).json()["sha256"]
    blob_path(state.settings, sha).unlink()

    queue = f"{state.settings.queue_prefix}.cpu"
    assert run_next(state.settings, state.db, queue, "test-worker", threading.Event()) == Status.FAILED
    job = queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input"
    assert file_id in job["error"]["message"]
    assert kinds(queue_client, headers, job_id) == ["created", "started", "finished"]
    assert run_next(state.settings, state.db, queue, "test-worker", threading.Event()) is None, "nothing left to start"


def test_a_job_shows_its_phase_and_streams_its_events_until_it_ends(queue_client):
    import json

    from worker.runner import _Run, run_next

    state = queue_client.app.state
    headers = tenant_headers(queue_client)
    file_id = upload(queue_client, headers, dataset(8, start=80_000)).json()["id"]
    job_id = submit_job(queue_client, headers, file_id, max_steps=2)["id"]
    assert queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()["phase"] is None

    # The status shows the phase the trainer announced, only while the job runs.
    with state.db.session() as session:
        attempt = states.claim(session, job_id, "w")
        job = session.get(Job, job_id)
    run = _Run(state.settings, state.db, job, attempt, threading.Event())
    run._on_event("phase", {"phase": "evaluating", "step": 2})
    assert queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()["phase"] == "evaluating"
    with state.db.session() as session:
        states.requeue(session, session.get(Job, job_id), attempt, "test")
    assert queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()["phase"] is None

    # The stream follows the real run to its end, and closes.
    queue = f"{state.settings.queue_prefix}.cpu"
    worker = threading.Thread(target=run_next, args=(state.settings, state.db, queue, "w", threading.Event()))
    worker.start()
    frames = []
    with queue_client.stream("GET", f"/v1/jobs/{job_id}/events/stream", headers=headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for block in response.iter_text():
            frames.append(block)
    worker.join(120)
    events = [
        dict(line.split(": ", 1) for line in frame.strip().splitlines())
        for frame in "".join(frames).split("\n\n") if frame.strip() and not frame.startswith(":")
    ]
    listed = queue_client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["data"]
    assert [int(e["id"]) for e in events] == [e["id"] for e in listed]
    assert [json.loads(e["data"]) for e in events] == listed
    assert [e["event"] for e in events] == [e["kind"] for e in listed]
    phases = [e["data"]["phase"] for e in listed if e["kind"] == "phase"]
    assert phases == ["evaluating", "preparing", "training", "evaluating", "saving"]
    assert listed[-1]["kind"] == "finished" and listed[-1]["data"]["status"] == "succeeded"
    assert queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()["phase"] is None

    # Resuming after an event sends only the later ones; another tenant's job is a 404.
    resumed = queue_client.get(f"/v1/jobs/{job_id}/events/stream", headers={**headers, "Last-Event-ID": str(listed[-3]["id"])})
    assert [int(line[4:]) for line in resumed.text.splitlines() if line.startswith("id: ")] == [e["id"] for e in listed[-2:]]
    assert queue_client.get(f"/v1/jobs/{job_id}/events/stream", headers=tenant_headers(queue_client)).status_code == 404
