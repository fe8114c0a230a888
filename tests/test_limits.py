"""One tenant cannot take the training workers from the others (issue 11, finding 3): work over
the server's limits is refused at submission, a job that keeps killing its worker or runs too
long ends failed, a cancel is honoured within a step, checkpoints load no code, and events
name no host or process."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import torch
from conftest_service import dataset, job_body, upload
from queue_support import queue_client, tenant_headers  # noqa: F401 - queue_client is a fixture
from sqlalchemy import update

from rlora.data import Example, encode_example
from rlora.training import TrainConfig, TrainingCancelled, train
from rlora.training.checkpoint import latest_checkpoint
from service.jobs import states
from service.jobs.reconciler import reconcile
from service.jobs.requests import InvalidJobRequest, JobRequest, check_job
from service.jobs.states import Status
from service.models import File, Job, utcnow
from worker.runner import run_next


def problems_of(response) -> list[dict]:
    """The 422's problems as ``{"field", "message"}``, whichever part of the API found them."""
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    return error.get("details") or [{"field": error.get("field"), "message": error["message"]}]


@pytest.mark.parametrize(
    ("part", "values", "field", "limit"),
    [
        ("training", dict(max_steps=10_000_000), "training.max_steps", "100000"),
        ("training", dict(batch_size=4096, gradient_accumulation_steps=4096), "training.batch_size", "131072"),
        ("training", dict(max_seq_len=2048), "training.max_seq_len", "context of 1024"),
        ("training", dict(eval_max_new_tokens=4096), "training.eval_max_new_tokens", "256"),
        ("training", dict(eval_max_examples=100_000), "training.eval_max_examples", "256"),
        ("adapter", dict(heads=32, rank=16), "adapter.heads", "256"),
        ("adapter", dict(alpha=1e38), "adapter.alpha", "10000"),
        ("adapter", dict(gamma=1e-9), "adapter.gamma", "0.01"),
        ("adapter", dict(init_scale=1e6), "adapter.init_scale", "100"),
    ],
)
def test_a_job_over_a_limit_is_a_422_naming_the_field_and_the_limit(client, new_tenant, part, values, field, limit):
    headers = new_tenant()
    body = job_body(upload(client, headers, dataset()).json()["id"])
    body[part].update(values)
    problems = problems_of(client.post("/v1/jobs", headers=headers, json=body))
    assert [p["field"] for p in problems] == [field]
    assert limit in problems[0]["message"]


def test_epochs_and_adapter_size_are_held_to_the_limits_too(client, new_tenant, app, service_settings):
    headers = new_tenant()
    file_id = upload(client, headers, dataset(12)).json()["id"]
    settings = service_settings.model_copy(update={"max_steps": 10, "max_adapter_params_per_layer": 1000})
    body = job_body(file_id, max_steps=None, epochs=3, batch_size=2)  # 11 training examples x 3 / 2 = 17 steps
    with app.state.db.session() as session:
        tenant_id = session.get(File, file_id).tenant_id
        with pytest.raises(InvalidJobRequest) as caught:
            check_job(session, settings, tenant_id, JobRequest.model_validate(body))
    epochs, size = caught.value.problems
    assert epochs == {"field": "training.epochs", "message": "3 epochs of 11 examples, 2 a step, are 17 steps, over the limit of 10 steps"}
    assert size["field"] == "adapter.rank" and "over the limit of 1000 a layer" in size["message"]


def test_the_same_file_twice_in_a_mixture_is_a_422(client, new_tenant):
    headers = new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    twin_id = upload(client, headers, dataset(), name="copy.jsonl").json()["id"]  # the same content
    body = job_body(file_id)
    body["mixture"] += [{"file_id": file_id, "task": "again"}, {"file_id": twin_id, "task": "twin"}]
    (problem,) = problems_of(client.post("/v1/jobs", headers=headers, json=body))
    assert problem["field"] == "mixture"
    assert "mixture[1] reads the same file as mixture[0]" in problem["message"]


def test_a_chat_record_over_the_message_limit_is_a_422_naming_its_line(client, new_tenant, service_settings):
    limit = service_settings.max_record_messages
    turns = [{"role": role, "content": "x"} for _ in range(limit // 2 + 1) for role in ("user", "assistant")]
    content = json.dumps({"messages": turns[:2]}) + "\n" + json.dumps({"messages": turns}) + "\n"
    response = upload(client, new_tenant(), content)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["error"]["details"]
    assert problem["line"] == 2 and problem["field"] == "messages"
    assert problem["message"] == f"has {len(turns)} messages, over the limit of {limit}"


def test_a_long_conversation_encodes_in_bounded_time(tiny_model_path):
    from rlora.basemodels import load_base_model

    _, tokenizer = load_base_model(tiny_model_path)
    turns = tuple({"role": role, "content": role[0] * 72} for _ in range(400) for role in ("user", "assistant"))
    example = Example(prompt=turns[-2]["content"], answer=turns[-1]["content"], task=None, messages=turns)
    started = time.perf_counter()
    encoded = encode_example(tokenizer, example, 256)
    # Every assistant turn re-rendered the conversation before it: 20 s here. Now only the
    # turns that truncation keeps are, a few.
    assert time.perf_counter() - started < 5
    labelled = [token for token, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100]
    assert len(encoded["input_ids"]) == 256 and len(labelled) > 2 * 72, "the final answer and earlier ones in the window"


def write_chat_dataset(path, records: int, turns: int) -> None:
    messages = [{"role": role, "content": role[0] * 40} for _ in range(turns) for role in ("user", "assistant")]
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for _ in range(records)))


def test_a_cancel_is_honoured_while_a_big_step_is_encoded(tmp_path, tiny_model_path):
    write_chat_dataset(tmp_path / "chat.jsonl", records=8, turns=100)
    config = TrainConfig(
        base_model=str(tiny_model_path),
        mixture=[{"path": str(tmp_path / "chat.jsonl"), "task": "chat"}],
        adapter={"method": "rlora", "heads": 2, "rank": 2, "target_modules": ["gate_proj"]},
        training={"max_steps": 2, "batch_size": 64, "gradient_accumulation_steps": 64, "max_seq_len": 1024, "device": "cpu"},
        output_dir=str(tmp_path / "run"),
    )
    checks: list[float] = []

    def should_stop() -> bool:  # asked after a few examples of the first step
        checks.append(time.perf_counter())
        return len(checks) > 3

    with pytest.raises(TrainingCancelled, match="stopped at step 0 of 2"):
        train(config, should_stop=should_stop)
    # The step holds 4096 long conversations: minutes of encoding had the stop waited for it.
    assert checks[-1] - checks[0] < 5


def test_a_checkpoint_that_would_run_code_is_refused_on_resume(add_dataset, tmp_path, tiny_model_path):
    config = TrainConfig(
        base_model=str(tiny_model_path),
        mixture=[{"path": str(add_dataset), "task": "add"}],
        adapter={"method": "rlora", "heads": 2, "rank": 2, "target_modules": ["gate_proj"]},
        training={"max_steps": 2, "batch_size": 2, "max_seq_len": 64, "checkpoint_every": 1, "eval_max_examples": 1, "device": "cpu"},
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(TrainingCancelled):
        train(config, on_progress=lambda progress: None, should_stop=lambda: bool(latest_checkpoint(tmp_path / "run")))
    optimizer_file = latest_checkpoint(tmp_path / "run") / "optimizer.pt"
    saved = torch.load(optimizer_file, weights_only=True)  # what a checkpoint holds is plain data
    saved["python_rng"] = _RunsCode()
    torch.save(saved, optimizer_file)
    with pytest.raises(Exception, match="Weights only load failed"):
        train(config)
    assert not _RunsCode.ran


class _RunsCode:
    ran = False

    def __reduce__(self):
        return (_RunsCode._run, ())

    @staticmethod
    def _run():
        _RunsCode.ran = True


@pytest.fixture
def add_dataset(tmp_path):
    path = tmp_path / "add.jsonl"
    path.write_text(dataset(12))
    return path


def lose_the_worker(client, job_id: str, worker: str) -> dict[str, int]:
    """``worker`` claims the job and stops beating; the reconciler's pass after the timeout."""
    state = client.app.state
    with state.db.session() as session:
        assert states.claim(session, job_id, worker) is not None
        stale = utcnow() - timedelta(seconds=state.settings.heartbeat_timeout + 1)
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=stale))
        session.commit()
    return reconcile(state.settings, state.db, state.celery)


def test_a_job_whose_worker_is_lost_three_times_fails_with_the_reason(queue_client):
    headers = tenant_headers(queue_client)
    file_id = upload(queue_client, headers, dataset()).json()["id"]
    job_id = queue_client.post("/v1/jobs", headers=headers, json=job_body(file_id)).json()["id"]
    assert queue_client.app.state.settings.max_job_attempts == 3
    assert lose_the_worker(queue_client, job_id, "rlora-4242@host-a")["requeued"] == 1
    assert lose_the_worker(queue_client, job_id, "rlora-4243@host-b")["requeued"] == 1
    assert lose_the_worker(queue_client, job_id, "rlora-4244@host-c") == {"requeued": 0, "cancelled": 0, "failed": 1, "sent": 0}

    job = queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "failed" and job["attempt"] == 3
    assert job["error"]["code"] == "worker_lost"
    assert job["error"]["message"].startswith("the worker was lost 3 times (no heartbeat for ")
    events = queue_client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["data"]
    assert [e["kind"] for e in events] == ["created", "started", "requeued", "started", "requeued", "started", "finished"]
    shown = json.dumps(events)
    assert "host-" not in shown and "4242" not in shown, "no host name or process id in a tenant's events"


def test_a_job_past_its_wall_clock_limit_fails_with_the_reason(queue_client):
    state = queue_client.app.state
    headers = tenant_headers(queue_client)
    file_id = upload(queue_client, headers, dataset()).json()["id"]
    body = job_body(file_id, max_steps=100_000, checkpoint_every=100_000)
    job_id = queue_client.post("/v1/jobs", headers=headers, json=body).json()["id"]
    settings = state.settings.model_copy(update={"max_job_seconds": 1.0})
    started = time.monotonic()
    assert run_next(settings, state.db, f"{settings.queue_prefix}.cpu", "w", threading.Event()) == Status.FAILED
    assert time.monotonic() - started < 30
    job = queue_client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["error"]["code"] == "time_limit"
    assert job["error"]["message"].startswith("the job ran past the limit of 1 s (stopped at step ")
