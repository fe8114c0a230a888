"""End to end with the official `openai` package, as a new user would: ``rlora serve`` on the
embedded default (SQLite, filesystem broker, one worker); upload a chat-format dataset, fine-tune,
poll to success, read the events and the checkpoint, chat with the fine-tuned model (streamed
too), and the errors (another tenant's model, n=2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest
from conftest_service import REPO, cli_tenant_key, free_port, rlora_command, service_env, stop_process, wait_for

openai = pytest.importorskip("openai")


def chat_dataset(n: int = 24) -> bytes:
    """OpenAI's chat format for fine-tuning: one {"messages": [...]} conversation a line."""
    lines = [
        json.dumps({"messages": [
            {"role": "system", "content": "You add."},
            {"role": "user", "content": f"{a}+{a + 1}="},
            {"role": "assistant", "content": str(2 * a + 1)},
        ]})
        for a in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


RLORA = {
    "adapter": {"method": "rlora", "heads": 2, "rank": 2, "target_modules": ["gate_proj"]},
    "training": {"max_steps": 3, "max_seq_len": 64, "checkpoint_every": 2, "eval_max_examples": 2, "eval_max_new_tokens": 2, "device": "cpu"},
    "task": "add",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_path):
    """``rlora serve`` on a free port: (base URL, home, log path)."""
    tmp_path = tmp_path_factory.mktemp("openai-e2e")
    home = tmp_path / "home"
    shutil.copytree(tiny_model_path, home / "models" / "tiny")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            rlora_command("serve", "--port", str(port)), cwd=REPO,
            env=service_env(home=home, progress_interval=0.2, inference_device="cpu"), stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            assert serve.poll() is None, log_path.read_text()
            return False

    try:
        wait_for(healthy, 60, 0.3, "rlora serve to answer /health")
        yield base, home, log_path
    finally:
        stop_process(serve, 30)  # SIGTERM, as a user stops it; killed if it has not stopped in 30 s


def test_fine_tune_and_chat_with_the_openai_client(server):
    base, home, log_path = server
    key = cli_tenant_key(home, "alice")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
    other = openai.OpenAI(base_url=f"{base}/v1", api_key=cli_tenant_key(home, "bob"), max_retries=0, timeout=60)

    training_file = client.files.create(file=("add.jsonl", chat_dataset()), purpose="fine-tune")
    assert training_file.purpose == "fine-tune" and training_file.status == "processed" and training_file.model_extra["records"] == 24
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=training_file.id, suffix="adder", seed=7, metadata={"team": "maths"},
        hyperparameters={"batch_size": 4, "learning_rate_multiplier": 2},
        extra_body={"rlora": RLORA},
    )
    assert isinstance(job, openai.types.fine_tuning.FineTuningJob)
    assert job.object == "fine_tuning.job" and job.status == "queued" and job.model == "tiny" and job.fine_tuned_model is None
    assert job.training_file == training_file.id and job.seed == 7 and job.metadata == {"team": "maths"}
    assert job.user_provided_suffix == "adder" and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(2) and job.hyperparameters.n_epochs == "auto"  # steps decide
    assert job.model_extra["rlora"]["training"]["learning_rate"] == pytest.approx(4e-4)
    # One job model, two views: the native route shows the same job.
    native = httpx.get(f"{base}/v1/jobs/{job.id}", headers={"Authorization": f"Bearer {key}"}).json()
    assert native["id"] == job.id and native["training"]["batch_size"] == 4 and native["mixture"][0]["task"] == "add"

    def finished():
        current = client.fine_tuning.jobs.retrieve(job.id)
        return current.status in ("succeeded", "failed", "cancelled") and current

    done = wait_for(finished, 240, 0.5, "the fine-tuning job to finish")
    assert done.status == "succeeded", (done, log_path.read_text()[-4000:])
    assert done.fine_tuned_model and done.finished_at >= done.created_at and done.trained_tokens > 0 and done.error is None

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert all(isinstance(e, openai.types.fine_tuning.FineTuningJobEvent) for e in events)
    assert events[0].message == "The job has successfully completed" and events[-1].message == "Created fine-tuning job"  # newest first
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert any(e.type == "metrics" and e.data["step"] for e in events)
    older = client.fine_tuning.jobs.list_events(job.id, limit=1, after=events[0].id)
    assert [e.id for e in older.data] == [events[1].id] and older.has_more
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [done.fine_tuned_model] and checkpoints[0].step_number == 3

    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "system", "content": "You add."}, {"role": "user", "content": "3+4="}],
        max_tokens=4, temperature=0,
    )
    assert reply.model == done.fine_tuned_model and reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "system", "content": "You add."}, {"role": "user", "content": "3+4="}],
        max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage == reply.usage

    # Another tenant: neither the model nor the job exists for it, in OpenAI's error shape.
    with pytest.raises(openai.NotFoundError) as info:
        other.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "3+4="}])
    assert info.value.code == "model_not_found" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as info:
        other.fine_tuning.jobs.retrieve(job.id)
    assert info.value.code == "not_found" and set(info.value.body) >= {"message", "type", "param", "code"}
    assert other.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "3+4="}], n=2)
    assert info.value.param == "n"

    # A second job, cancelled while queued or running; the list pages newest first.
    second = client.fine_tuning.jobs.create(model="tiny", training_file=training_file.id, extra_body={"rlora": RLORA})
    cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.id == second.id and cancelled.status in ("cancelled", "running")
    page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [second.id] and page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == [second.id, job.id]  # auto-pagination with after
    wait_for(lambda: client.fine_tuning.jobs.retrieve(second.id).status == "cancelled", 120, 0.5, "the second job to be cancelled")
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)  # it ended already


def test_bad_fine_tuning_requests_are_400_naming_the_parameter(server):
    base, home, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=cli_tenant_key(home, "carol"), max_retries=0, timeout=60)
    training_file = client.files.create(file=("add.jsonl", chat_dataset(8)), purpose="fine-tune")
    cases = [
        (dict(model="tiny", training_file="file-nope"), "training_file"),
        (dict(model="gpt-4o-mini", training_file=training_file.id), "model"),
        (dict(model="tiny", training_file=training_file.id, hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs"),
        (dict(model="tiny", training_file=training_file.id, method={"type": "dpo"}), "method.type"),
        (dict(model="tiny", training_file=training_file.id, extra_body={"rlora": {"adapter": {"heads": 0}}}), "rlora.adapter.heads"),
        (dict(model="tiny", training_file=training_file.id, hyperparameters={"batch_size": 2},
              extra_body={"rlora": {"training": {"batch_size": 4}}}), "hyperparameters.batch_size"),
        (dict(model="tiny", training_file=training_file.id, extra_body={"rlora": {"training": {"max_steps": 10**7}}}), "rlora.training.max_steps"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.fine_tuning.jobs.create(**kwargs)
        assert info.value.param == param and info.value.body["type"] == "invalid_request_error", (param, info.value.body)
    assert client.fine_tuning.jobs.list().data == []  # nothing half-made
    started = time.monotonic()
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.list_events("job-nope")
    assert time.monotonic() - started < 10
