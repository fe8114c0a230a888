"""The ``rlora`` client commands end to end against a real ``rlora serve`` (API and embedded
worker, SQLite): what they print, their exit codes, and the server's errors shown as messages,
never tracebacks. Most commands run in this process through ``main(argv)``; the ones whose
output a shell captures run as the installed command."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import httpx
import pytest
import yaml
from conftest_service import REPO, dataset, free_port, rlora_command, service_env, stop_process, tiny_training, wait_until_answering

from service.cli import main


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_path):
    """``rlora serve`` on a port of its own: its base URL and home."""
    home = tmp_path_factory.mktemp("client-home")
    shutil.copytree(tiny_model_path, home / "models" / "tiny")
    port = free_port()
    log_path = home / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            rlora_command("serve", "--port", str(port)), cwd=REPO, env=service_env(home=home, progress_interval=0.2),
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_answering(f"{base}/health", process, log_path)
        yield base, home
    finally:
        stop_process(process, 60)


def make_tenant(home, name: str) -> str:
    """``rlora tenant create``'s stdout, as ``KEY=$(rlora tenant create NAME)`` takes it."""
    made = subprocess.run(rlora_command("tenant", "create", name), cwd=REPO, env=service_env(home=home), capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    return made.stdout


@pytest.fixture(scope="module")
def key(server) -> str:
    stdout = make_tenant(server[1], "alice")
    assert stdout.count("\n") == 1 and stdout.startswith("rlk_"), stdout  # the key alone
    return stdout.strip()


@pytest.fixture
def rlora(server, key, capsys, monkeypatch, tmp_path):
    """Runs ``rlora ARGS`` in this process against the server with alice's key (from the
    environment, as a user would set it): (exit code, stdout, stderr)."""
    for name in ("RLORA_API_URL", "RLORA_API_KEY", "RLORA_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RLORA_API_URL", server[0])
    monkeypatch.setenv("RLORA_API_KEY", key)
    monkeypatch.setenv("RLORA_PROFILE", str(tmp_path / "no-profile.json"))

    def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run


def job_file(folder, data: str = "add.jsonl", **training) -> str:
    """A job YAML like ``rlora train``'s (a local path, an output_dir) beside its dataset."""
    (folder / data).write_text(dataset(20, task="add"))
    config = {
        "base_model": "tiny",
        "mixture": [{"path": data, "task": "add", "weight": 1.0}],
        "adapter": {"method": "rlora", "heads": 2, "rank": 2, "target_modules": ["gate_proj"]},
        "training": tiny_training(**training),
        "output_dir": "runs/first",
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == "rlora 0.1.0"


def test_the_workflow_from_upload_to_chat(rlora, tmp_path):
    config = job_file(tmp_path)
    code, out, err = rlora("files", "upload", str(tmp_path / "add.jsonl"))
    assert code == 0 and out.startswith("file-") and out.count("\n") == 1 and "20 records (add: 20)" in err
    file_id = out.strip()
    code, out, _ = rlora("files", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "FILENAME", "RECORDS"] and file_id in out

    code, out, err = rlora("jobs", "create", config)
    assert code == 0, err
    job_id = out.strip()
    assert job_id.startswith("job-") and f"uploaded before as {file_id}" in err and "output_dir is not used" in err

    code, out, err = rlora("jobs", "watch", job_id, "--interval", "0.3")
    assert code == 0, err
    adapter_id = out.strip()
    assert adapter_id.startswith("ad-")
    assert "4/4" in err and "loss=" in err and "created" in err and "finished" in err
    assert f"job {job_id} succeeded; eval add: loss" in err

    code, out, _ = rlora("jobs", "get", job_id)
    job = json.loads(out)
    assert code == 0 and job["status"] == "succeeded" and job["adapter_id"] == adapter_id
    assert job["mixture"][0]["file_id"] == file_id
    code, out, _ = rlora("jobs", "events", job_id)
    kinds = [line.split()[2] for line in out.splitlines()]
    assert code == 0 and kinds[0] == "created" and kinds[-1] == "finished" and "progress" in kinds
    code, out, _ = rlora("jobs", "list", "--status", "succeeded")
    assert code == 0 and any(line.split()[:2] == [job_id, "succeeded"] for line in out.splitlines())
    code, out, _ = rlora("jobs", "list", "--json")
    assert code == 0 and job_id in [j["id"] for j in json.loads(out)]

    code, out, _ = rlora("adapters", "list")
    assert code == 0 and any(line.split()[:2] == [adapter_id, job_id] for line in out.splitlines())
    target = tmp_path / "adapter.zip"
    code, out, err = rlora("adapters", "download", adapter_id, "-o", str(target))
    assert code == 0 and out.strip() == str(target)
    names = {name.split("/")[-1] for name in zipfile.ZipFile(target).namelist()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    code, out, _ = rlora("adapters", "download", adapter_id, "-o", str(tmp_path))  # into a folder
    assert code == 0 and out.strip() == str(tmp_path / f"{adapter_id}.zip") and zipfile.is_zipfile(out.strip())
    code, _, err = rlora("adapters", "download", adapter_id, "-o", str(tmp_path / "no" / "such.zip"))
    assert code == 2 and "no such folder" in err

    # Streamed: what the terminal shows is the generation /generate gives.
    code, out, _ = rlora("generate", "3+4=", "--adapter", adapter_id, "--max-new-tokens", "5", "--seed", "1")
    assert code == 0
    with httpx.Client(base_url=os.environ["RLORA_API_URL"], headers={"Authorization": f"Bearer {os.environ['RLORA_API_KEY']}"}) as api:
        whole = api.post("/generate", json={"inputs": "3+4=", "parameters": {"adapter_id": adapter_id, "max_new_tokens": 5, "seed": 1, "details": True}})
    tokens = whole.json()["details"]["tokens"]
    assert out == "".join(t["text"] for t in tokens if not t["special"]) + "\n"

    # A conversation: each answer is the chat route's greedy answer to every turn so far (the
    # empty line skipped); --no-history sends each line alone.
    code, out, err = rlora("chat", "--adapter", adapter_id, "--max-new-tokens", "3", stdin="1+1=\n\n2+2=\n")
    assert code == 0 and len(out.splitlines()) == 2, err
    first, second = out.splitlines()

    def chat(messages):
        with httpx.Client(base_url=os.environ["RLORA_API_URL"], headers={"Authorization": f"Bearer {os.environ['RLORA_API_KEY']}"}) as api:
            reply = api.post("/v1/chat/completions", json={"model": adapter_id, "messages": messages, "max_tokens": 3, "temperature": 0})
        return reply.json()["choices"][0]["message"]["content"]

    user = [{"role": "user", "content": "1+1="}]
    assert first == chat(user)
    assert second == chat([*user, {"role": "assistant", "content": first}, {"role": "user", "content": "2+2="}])
    code, out, err = rlora("chat", "--adapter", adapter_id, "--max-new-tokens", "3", "--no-history", stdin="1+1=\n2+2=\n")
    assert code == 0 and out.splitlines() == [first, chat([{"role": "user", "content": "2+2="}])]
    code, out, err = rlora("chat", "--adapter", "adapter-none", stdin="1+1=\n")
    assert code == 1 and "adapter-none" in err and "[HTTP 404 model_not_found]" in err, err


def test_watch_exit_codes_for_a_failed_and_a_cancelled_job(rlora, tmp_path):
    # The embedded worker takes every queue: a CUDA job on this CPU host fails, with its reason.
    code, out, err = rlora("jobs", "create", job_file(tmp_path, device="cuda"), "--watch")
    assert code == 1, err
    assert out.startswith("job-") and "failed:" in err

    # An entry may name an uploaded file by its id instead of a local path.
    code, out, _ = rlora("files", "upload", str(tmp_path / "add.jsonl"))
    file_id = out.strip()
    config = yaml.safe_load(open(job_file(tmp_path, max_steps=100_000, checkpoint_every=100_000)))
    config["mixture"] = [{"file_id": file_id, "task": "add", "weight": 1.0}]
    (tmp_path / "by-id.yaml").write_text(yaml.safe_dump(config))
    code, out, err = rlora("jobs", "create", str(tmp_path / "by-id.yaml"))
    job_id = out.strip()
    assert code == 0 and "uploaded" not in err
    assert rlora("jobs", "get", job_id)[1].count(file_id) == 1
    code, out, _ = rlora("jobs", "cancel", job_id)
    assert code == 0 and out.startswith(f"job {job_id}: ")
    code, out, err = rlora("jobs", "watch", job_id, "--interval", "0.3")
    assert code == 3 and f"job {job_id} was cancelled" in err and out == ""


def test_errors_are_the_servers_messages_and_exit_non_zero(rlora, server, tmp_path):
    code, _, err = rlora("files", "upload", str(tmp_path / "missing.jsonl"))
    assert code == 2 and f"no such file {tmp_path / 'missing.jsonl'}" in err
    code, _, err = rlora("jobs", "create", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such file" in err

    # A 4xx naming its field.
    config = job_file(tmp_path, max_steps=0)
    code, _, err = rlora("jobs", "create", config)
    assert code == 1 and "training.max_steps" in err and "[HTTP 422 invalid_request]" in err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n')
    code, _, err = rlora("files", "upload", str(tmp_path / "bad.jsonl"))
    assert code == 1 and "invalid dataset" in err and "line 1" in err and "[HTTP 422 invalid_dataset]" in err
    code, _, err = rlora("jobs", "get", "job-nope")
    assert code == 1 and "no job 'job-nope'" in err and "404" in err

    code, _, err = rlora("jobs", "list", "--key", "rlk_not-a-key")
    assert code == 1 and "401" in err and "the key from --key was refused" in err
    code, _, err = rlora("files", "list", "--api", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach the rlora API" in err

    # As the installed command, the same: a message and an exit code, no traceback.
    env = service_env(api_url=f"http://127.0.0.1:{free_port()}", api_key="rlk_x", profile=tmp_path / "none.json")
    down = subprocess.run(rlora_command("jobs", "list"), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "cannot reach the rlora API" in down.stderr and "Traceback" not in down.stderr
    env = service_env(profile=tmp_path / "none.json")
    keyless = subprocess.run(rlora_command("files", "list", "--api", server[0]), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert keyless.returncode == 2 and "no API key" in keyless.stderr and "Traceback" not in keyless.stderr


def test_login_keeps_a_private_profile_and_keys_rotate_updates_it(rlora, server, key, monkeypatch, tmp_path):
    base, home = server
    alice_key, key = key, make_tenant(home, "carol").strip()
    profile = tmp_path / "config" / "profile.json"
    monkeypatch.delenv("RLORA_API_URL")
    monkeypatch.delenv("RLORA_API_KEY")
    monkeypatch.setenv("RLORA_PROFILE", str(profile))

    code, _, err = rlora("login", "--api", base, stdin="rlk_wrong\n")
    assert code == 2 and "refused the key" in err and not profile.exists()
    code, _, err = rlora("login", "--api", base, stdin=f"{key}\n")
    assert code == 0 and str(profile) in err
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600 and json.loads(profile.read_text()) == {"api_url": base, "api_key": key}

    code, out, _ = rlora("keys", "list")  # the profile's address and key
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:4] == ["ID", "PREFIX", "NAME", "STATUS"] and len(rows) == 1
    key_id = rows[0].split()[0]

    code, out, err = rlora("keys", "rotate", key_id)
    new_key = out.strip()
    assert code == 0 and new_key.startswith("rlk_") and new_key != key and "now holds the new key" in err
    assert json.loads(profile.read_text())["api_key"] == new_key
    code, out, _ = rlora("keys", "list", "--json")
    statuses = {k["id"]: k["status"] for k in json.loads(out)}
    assert code == 0 and statuses[key_id] == "revoked" and sorted(statuses.values()) == ["active", "revoked"]
    code, _, err = rlora("files", "list", "--key", key)
    assert code == 1 and "401" in err

    code, _, err = rlora("keys", "rotate", key_id)  # revoked: nothing to rotate
    assert code == 1 and "revoked" in err and "409" in err
    code, out, _ = rlora("keys", "revoke", key_id)
    assert code == 0 and f"key {key_id}" in out and "revoked at" in out
    code, _, err = rlora("keys", "rotate", new_key_id(rlora), "--key", alice_key)  # another tenant's key
    assert code == 1 and "404" in err


def new_key_id(rlora) -> str:
    """The id of the profile's tenant's active key."""
    code, out, _ = rlora("keys", "list", "--json")
    return next(k["id"] for k in json.loads(out) if k["status"] == "active")
