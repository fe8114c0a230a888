"""The reconciler and the job runner in-process, against SQLite and PostgreSQL.

The broker is the embedded (filesystem) one of the API test settings; no worker consumes it,
so the messages the reconciler sends can be read back from its folder.
"""

from __future__ import annotations

from datetime import timedelta

from conftest_service import dataset, submit_job, upload
from sqlalchemy import update

from service.jobs import states
from service.jobs.states import Status
from service.models import Job, utcnow
from service.jobs.storage import blob_path
from worker.reconciler import reconcile


def submit(client, headers, content=None) -> str:
    return submit_job(client, headers, upload(client, headers, content or dataset()).json()["id"])["id"]


def messages_for(settings, job_id: str) -> int:
    return sum(job_id in path.read_text(errors="replace") for path in (settings.broker_dir / "messages").iterdir())


def set_job(app, job_id: str, **values) -> None:
    with app.state.db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def kinds(client, headers, job_id) -> list[str]:
    return [e["kind"] for e in client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["data"]]


def test_a_running_job_with_a_stale_heartbeat_is_queued_again(client, new_tenant, app, service_settings):
    headers = new_tenant()
    job_id = submit(client, headers)
    with app.state.db.session() as session:
        attempt = states.claim(session, job_id, "lost-worker")
    reconcile(service_settings, app.state.db, app.state.celery)
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "running", "heartbeat is fresh"

    set_job(app, job_id, heartbeat_at=utcnow() - timedelta(seconds=service_settings.heartbeat_timeout + 1))
    sent_before = messages_for(service_settings, job_id)
    reconcile(service_settings, app.state.db, app.state.celery)
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "queued" and job["attempt"] == attempt
    assert kinds(client, headers, job_id)[-1] == "requeued"
    assert messages_for(service_settings, job_id) == sent_before + 1
    with app.state.db.session() as session:
        assert states.claim(session, job_id, "next-worker") == attempt + 1


def test_a_lost_job_that_was_being_cancelled_ends_cancelled(client, new_tenant, app, service_settings):
    headers = new_tenant()
    job_id = submit(client, headers)
    with app.state.db.session() as session:
        states.claim(session, job_id, "lost-worker")
    client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    set_job(app, job_id, heartbeat_at=utcnow() - timedelta(hours=1))
    reconcile(service_settings, app.state.db, app.state.celery)
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "cancelled"


def test_a_queued_job_whose_message_was_lost_is_sent_again_once(client, new_tenant, app, service_settings):
    headers = new_tenant()
    job_id = submit(client, headers)
    assert messages_for(service_settings, job_id) == 1
    reconcile(service_settings, app.state.db, app.state.celery)
    assert messages_for(service_settings, job_id) == 1, "not overdue yet"

    set_job(app, job_id, enqueued_at=utcnow() - timedelta(seconds=service_settings.requeue_after + 1))
    reconcile(service_settings, app.state.db, app.state.celery)
    reconcile(service_settings, app.state.db, app.state.celery)
    assert messages_for(service_settings, job_id) == 2
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "queued"


def test_a_job_whose_file_vanished_fails_with_a_readable_error(client, new_tenant, app, service_settings):
    from worker.runner import run_job

    headers = new_tenant()
    content = dataset(5, start=70_000)
    job_id = submit(client, headers, content)
    file_id = client.get(f"/v1/jobs/{job_id}", headers=headers).json()["mixture"][0]["file_id"]
    sha = client.get(f"/v1/files/{file_id}", headers=headers).json()["sha256"]
    blob_path(service_settings, sha).unlink()

    assert run_job(service_settings, app.state.db, job_id, "test-worker") == Status.FAILED
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input"
    assert file_id in job["error"]["message"]
    assert kinds(client, headers, job_id) == ["created", "started", "finished"]
    assert run_job(service_settings, app.state.db, job_id, "test-worker") is None, "a finished job is not run again"
