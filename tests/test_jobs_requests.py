"""A job request checked by the job domain alone (no HTTP), and turned into the trainer's
input by the one function the worker uses too."""

from __future__ import annotations

import pytest
from conftest_service import dataset, job_body, upload

from service.jobs.requests import InvalidJobRequest, JobRequest, check_job, mixture_file_ids, tenant_files, train_config
from service.jobs.storage import blob_path
from service.models import File


def test_every_problem_is_reported_as_a_field_and_message(client, new_tenant, app, service_settings):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    body = job_body(file_id)
    with app.state.db.session() as session:
        tenant_id = session.get(File, file_id).tenant_id
        unknown = JobRequest.model_validate({**body, "base_model": "nope", "mixture": [{"file_id": "file-missing", "task": "a"}]})
        with pytest.raises(InvalidJobRequest) as caught:
            check_job(session, service_settings, tenant_id, unknown)
        assert [p["field"] for p in caught.value.problems] == ["base_model", "mixture[0].file_id"]

        # The trainer's own rules that span fields: one task per dataset.
        twice = JobRequest.model_validate({**body, "mixture": body["mixture"] * 2})
        with pytest.raises(InvalidJobRequest) as caught:
            check_job(session, service_settings, tenant_id, twice)
        assert caught.value.problems[0]["field"] == "mixture" and "appears twice" in caught.value.problems[0]["message"]


def test_a_checked_job_becomes_the_trainer_input_the_worker_builds(client, new_tenant, app, service_settings, tmp_path):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    with app.state.db.session() as session:
        tenant_id = session.get(File, file_id).tenant_id
        checked = check_job(session, service_settings, tenant_id, JobRequest.model_validate(job_body(file_id)))
        assert checked.file_ids == [file_id] and checked.job.queue == f"{service_settings.queue_prefix}.cpu"
        files = tenant_files(session, tenant_id, mixture_file_ids(checked.job.mixture))
    config = train_config(service_settings, checked.job, files, tmp_path)
    assert config.mixture[0].path == str(blob_path(service_settings, files[file_id].sha256))
    assert config.adapter == checked.job.adapter and config.output_dir == str(tmp_path)
