"""The trainer: learning, exact resume, cancellation, outputs, and `rlora train`."""

import hashlib
import json
import math
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlora.training import Progress, TrainConfig, TrainingCancelled, read_train_config, train
from rlora.training.checkpoint import latest_checkpoint, run_fingerprint
from service.cli import main as rlora_command


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def datasets(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdef") for _ in range(4)) for _ in range(120)]
    reverse = write_jsonl(tmp_path / "reverse.jsonl", [{"prompt": f"rev {w}", "completion": w[::-1]} for w in words])
    answer = write_jsonl(
        tmp_path / "answer.jsonl",
        [{"instruction": "Say ok.", "input": w, "output": "ok", "task": "answer"} for w in words],
    )
    return {"reverse": reverse, "answer": answer}


def make_config(datasets, output_dir, **training):
    settings = dict(max_steps=12, batch_size=4, learning_rate=5e-3, max_seq_len=48, checkpoint_every=4,
                    eval_max_examples=8, eval_max_new_tokens=4, validation_share=0.1)
    settings.update(training)
    return TrainConfig(
        base_model="tiny",
        mixture=[{"path": datasets["reverse"], "task": "reverse", "weight": 1.0},
                 {"path": datasets["answer"], "task": "answer", "weight": 2.0}],
        adapter={"method": "rlora", "heads": 3, "rank": 4, "dropout": 0.2},
        training=settings,
        output_dir=str(output_dir),
    )


def run(config, tiny_model_path, **callbacks):
    return train(config, cache_dir=tiny_model_path.parent, **callbacks)


def adapter_tensors(output_dir):
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def test_loss_falls_and_an_easy_task_is_learned(datasets, tmp_path, tiny_model_path):
    config = make_config(datasets, tmp_path / "out", max_steps=50, learning_rate=3e-2, checkpoint_every=100)
    config.mixture.pop(0)  # only the constant-answer task
    metrics = run(config, tiny_model_path)
    losses = [point["loss"] for point in metrics["train_loss"]]
    assert len(losses) == 50
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:3]) / 3
    assert metrics["eval"]["answer"]["accuracy"] == 1.0  # the constant answer is learned exactly
    assert metrics["eval"]["answer"]["loss"] < 0.7 * losses[0]


def test_outputs_metrics_and_adapter_folder(datasets, tmp_path, tiny_model_path):
    events = []
    progress = []
    metrics = run(make_config(datasets, tmp_path / "out"), tiny_model_path,
                  on_event=lambda kind, data: events.append((kind, data)), on_progress=progress.append)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert set(metrics) >= {"train_loss", "eval", "head_similarity", "routing", "tokens_per_second", "peak_memory_bytes"}
    assert set(metrics["eval"]) == {"reverse", "answer"}
    assert 0 <= metrics["head_similarity"]["mean"] < 1
    assert len(metrics["routing"]["per_layer"]) == 6 and metrics["tokens_per_second"] > 0
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert [kind for kind, _ in events] == ["phase", "phase"] + ["checkpoint"] * 3 + ["phase", "eval", "phase"]
    assert [data["phase"] for kind, data in events if kind == "phase"] == ["preparing", "training", "evaluating", "saving"]
    assert [data["step"] for kind, data in events if kind == "checkpoint"] == [4, 8, 12]
    assert [p.step for p in progress] == list(range(1, 13))
    assert all(isinstance(p, Progress) and p.total_steps == 12 and p.learning_rate > 0 for p in progress)
    assert progress[-1].eta_seconds == 0
    # Linear warmup from the first step (never a step at learning rate 0), then cosine decay to 0.
    warmup = math.ceil(0.03 * 12)
    expected = [5e-3 * (s + 1) / (warmup + 1) if s < warmup else 5e-3 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (12 - warmup)))
                for s in range(12)]
    assert [p.learning_rate for p in progress] == pytest.approx(expected, rel=1e-9)
    # Checkpoints are complete folders, the oldest pruned, nothing half-written left.
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["step-00000008", "step-00000012"]
    # Running a finished config again returns its metrics without training; another config
    # in the same output_dir is refused rather than answered with the old run's results.
    assert run(make_config(datasets, tmp_path / "out"), tiny_model_path, on_progress=progress.append) == written
    assert len(progress) == 12
    with pytest.raises(ValueError, match="finished run of a different run"):
        run(make_config(datasets, tmp_path / "out", max_steps=20), tiny_model_path)


def test_the_built_in_tiny_model_needs_a_cache_dir(datasets, tmp_path):
    with pytest.raises(ValueError, match="cache_dir"):
        train(make_config(datasets, tmp_path / "out"))


class Crash(Exception):
    pass


def test_killed_run_resumes_to_the_same_adapter(datasets, tmp_path, tiny_model_path):
    straight = run(make_config(datasets, tmp_path / "straight"), tiny_model_path)

    def crash_at_step_6(progress):
        if progress.step == 6:
            raise Crash()  # after step 6, while the last checkpoint is step 4

    with pytest.raises(Crash):
        run(make_config(datasets, tmp_path / "resumed"), tiny_model_path, on_progress=crash_at_step_6)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000004"
    events = []
    resumed = run(make_config(datasets, tmp_path / "resumed"), tiny_model_path,
                  on_event=lambda kind, data: events.append((kind, data)))
    assert events[:2] == [("phase", {"phase": "preparing"}), ("resumed", {"step": 4})]
    assert [p["loss"] for p in resumed["train_loss"]] == pytest.approx([p["loss"] for p in straight["train_loss"]], abs=1e-5)
    expected = adapter_tensors(tmp_path / "straight")
    got = adapter_tensors(tmp_path / "resumed")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5)
    assert resumed["eval"] == straight["eval"]


def test_a_checkpoint_of_the_previous_adapter_format_resumes_with_its_layer(datasets, tmp_path, tiny_model_path):
    """A run checkpointed before router_init existed (zero router, mean-head correction, no
    router0 saved; its fingerprint of a config without router_init) resumes, after an upgrade,
    with the layer it began with; a new run of the same config gets the routed correction."""
    def with_adapter(output_dir, **adapter):
        config = make_config(datasets, output_dir)
        return config.model_copy(update={"adapter": {**config.adapter, **adapter}})

    straight = run(with_adapter(tmp_path / "straight", router_init="zero"), tiny_model_path)
    old_dir = tmp_path / "old"
    with pytest.raises(Crash):
        run(with_adapter(old_dir, router_init="zero"), tiny_model_path,
            on_progress=lambda p: (_ for _ in ()).throw(Crash()) if p.step == 6 else None)
    checkpoint = latest_checkpoint(old_dir)
    assert not any(name.endswith(".router0") for name in load_file(checkpoint / "adapter.safetensors"))
    # What the previous version wrote: its fingerprint of the config, whose adapter had no router_init.
    upgraded = with_adapter(old_dir)
    previous = upgraded.model_dump(exclude={"output_dir": True, "training": {"compile", "base_kernels", "quantization"}, "adapter": {"router_init"}})
    previous_run = hashlib.sha256(json.dumps(previous, sort_keys=True).encode()).hexdigest()[:16]
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({**state, "run": previous_run}))

    resumed = run(upgraded, tiny_model_path)
    assert resumed["run"] == previous_run != run_fingerprint(upgraded)
    assert run(upgraded, tiny_model_path) == resumed  # and, finished, it is that run's result
    assert [p["loss"] for p in resumed["train_loss"]] == pytest.approx([p["loss"] for p in straight["train_loss"]], abs=1e-5)
    assert json.loads((old_dir / "adapter" / "adapter_config.json").read_text())["router_init"] == "zero"
    for name, tensor in adapter_tensors(tmp_path / "straight").items():
        torch.testing.assert_close(adapter_tensors(old_dir)[name], tensor, rtol=0, atol=1e-5)
    # A new run of the same config (no checkpoint) starts with the routed correction.
    fresh = run(with_adapter(tmp_path / "fresh"), tiny_model_path)
    assert fresh["steps"] == 12 and any(name.endswith(".router0") for name in adapter_tensors(tmp_path / "fresh"))


def test_resume_refuses_a_checkpoint_of_another_config(datasets, tmp_path, tiny_model_path):
    with pytest.raises(Crash):
        run(make_config(datasets, tmp_path / "out"), tiny_model_path,
            on_progress=lambda p: (_ for _ in ()).throw(Crash()) if p.step == 5 else None)
    with pytest.raises(ValueError, match="different run"):
        run(make_config(datasets, tmp_path / "out", learning_rate=1e-3), tiny_model_path)


def test_should_stop_cancels_within_a_step(datasets, tmp_path, tiny_model_path):
    steps = []
    with pytest.raises(TrainingCancelled, match="stopped at step 3 of 12"):
        run(make_config(datasets, tmp_path / "out"), tiny_model_path,
            on_progress=lambda p: steps.append(p.step), should_stop=lambda: len(steps) >= 3)
    assert steps == [1, 2, 3]
    assert not (tmp_path / "out" / "adapter").exists()


def test_should_stop_is_honoured_during_the_final_evaluation(datasets, tmp_path, tiny_model_path):
    events, checks_after_training = [], []

    def should_stop() -> bool:
        if events and events[-1] == ("phase", 2):  # the last step is done, "evaluating" announced
            checks_after_training.append(True)
        return len(checks_after_training) >= 2  # the first batch evaluated, then stop

    with pytest.raises(TrainingCancelled, match="stopped at step 2 of 2 while evaluating"):
        run(make_config(datasets, tmp_path / "out", max_steps=2, checkpoint_every=2), tiny_model_path,
            on_event=lambda kind, data: events.append((kind, data.get("step"))), should_stop=should_stop)
    assert "eval" not in [kind for kind, _ in events]
    assert not (tmp_path / "out" / "adapter").exists()


def test_gradient_accumulation_matches_a_bigger_batch(datasets, tmp_path, tiny_model_path):
    def final(output, **settings):
        config = make_config(datasets, tmp_path / output, max_steps=3, **settings)
        config.adapter["dropout"] = 0.0
        run(TrainConfig(**config.model_dump()), tiny_model_path)
        return adapter_tensors(tmp_path / output)

    big = final("big", batch_size=8)
    accumulated = final("accumulated", batch_size=4, gradient_accumulation_steps=2)
    # Adam divides by the gradient's root mean square, so float32 summation-order noise in a
    # near-zero gradient entry can move that entry by a few 1e-6 after three steps; a wrong
    # normalisation of the accumulated loss moves every entry by far more than 1e-5.
    for name, tensor in big.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-4, atol=1e-5)


def test_epochs_decide_the_length(datasets, tmp_path, tiny_model_path):
    config = make_config(datasets, tmp_path / "out", max_steps=None, epochs=0.25, batch_size=8, eval_max_examples=1)
    metrics = run(config, tiny_model_path)
    # 0.25 * (108 + 108 training examples) / 8 per step
    assert metrics["steps"] == 7


def test_gradient_checkpointing_gives_the_same_training(datasets, tmp_path, tiny_model_path):
    plain = run(make_config(datasets, tmp_path / "plain", max_steps=3), tiny_model_path)
    checkpointed = run(make_config(datasets, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True), tiny_model_path)
    assert [p["loss"] for p in checkpointed["train_loss"]] == pytest.approx([p["loss"] for p in plain["train_loss"]], abs=1e-5)


def test_read_train_config_reports_every_bad_field(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "base_model: tiny\n"
        "mixture:\n  - {path: a.jsonl, task: qa, weight: 0}\n"
        "adapter: {heads: 100}\n"
        "training: {max_steps: 0, lerning_rate: 1}\n"
        "output_dir: out\n"
    )
    with pytest.raises(ValueError) as err:
        read_train_config(tmp_path / "bad.yaml")
    message = str(err.value)
    for expected in ("mixture[0].weight", "adapter", "heads", "training.max_steps", "training.lerning_rate"):
        assert expected in message
    (tmp_path / "broken.yaml").write_text("base_model: [tiny\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_train_config(tmp_path / "broken.yaml")


def test_rlora_train_exit_codes(datasets, tmp_path, capsys):
    (tmp_path / "missing.yaml").write_text(
        "base_model: tiny\nmixture: [{path: nowhere.jsonl, task: qa}]\noutput_dir: out\n"
    )
    assert rlora_command(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "unknown.yaml").write_text(
        f"base_model: no-such-model\nmixture: [{{path: {datasets['reverse']}, task: qa}}]\n"
        "training: {max_steps: 1}\noutput_dir: out\n"
    )
    assert rlora_command(["train", str(tmp_path / "unknown.yaml")]) == 1
    assert "unknown base model 'no-such-model'" in capsys.readouterr().err


def test_rlora_train_command_end_to_end_resumes_after_a_kill(datasets, tmp_path, tiny_model_path):
    """The installed command: killed mid-run, the same command again finishes from the checkpoint."""
    config = tmp_path / "run.yaml"
    config.write_text(
        "base_model: tiny\n"
        f"mixture:\n  - {{path: {datasets['reverse']}, task: reverse}}\n  - {{path: {datasets['answer']}, task: answer, weight: 2}}\n"
        "adapter: {method: rlora, heads: 3, rank: 4}\n"
        "training: {max_steps: 150, batch_size: 4, max_seq_len: 48, checkpoint_every: 5, eval_max_examples: 4, eval_max_new_tokens: 4}\n"
        "output_dir: out\n"
    )
    env = {"RLORA_HOME": str(tiny_model_path.parent.parent), "PATH": __import__("os").environ["PATH"]}
    command = [sys.executable, "-m", "service.cli", "train", str(config)]  # the `rlora train` command
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_dir = tmp_path / "out"
    import time
    deadline = time.monotonic() + 120
    while latest_checkpoint(out_dir) is None or latest_checkpoint(out_dir).name < "step-00000010":
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert not (out_dir / "metrics.json").exists()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert "resuming from the checkpoint at step" in finished.stderr
    summary = json.loads(finished.stdout)
    assert summary["steps"] == 150 and set(summary["eval"]) == {"reverse", "answer"}
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout) == summary
    assert "holds this run already finished" in again.stderr and "resuming" not in again.stderr


def test_eval_keeps_truncated_prompts_and_counts_answers_over_the_limit(datasets, tmp_path, tiny_model_path):
    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 200, "completion": "ok"}] * 5 + [{"prompt": "y", "completion": "ok"}] * 40)
    config = make_config(datasets, tmp_path / "out", max_steps=2, max_seq_len=24, validation_share=0.5, eval_max_examples=30,
                         eval_max_new_tokens=1)
    config.mixture[0].path = long_prompt
    metrics = run(config, tiny_model_path)
    reverse = metrics["eval"]["reverse"]
    # Long prompts are truncated from the left, so every example keeps its answer here...
    assert reverse["skipped"] == 0 and reverse["examples"] == 22
    # ...and answers longer than eval_max_new_tokens are counted, as exact match cannot hold.
    assert reverse["answers_over_limit"] == 22


def test_a_mixture_entry_takes_its_tasks_from_the_records_labels(tmp_path, tiny_model_path):
    # HydraLoRA's public example mixture: task_type "" (no task) and the integer 1.
    records = [{"instruction": f"echo {i}", "input": "", "output": str(i), "task_type": ""} for i in range(30)]
    records += [{"instruction": f"double {i}", "input": "", "output": str(2 * i), "task_type": 1} for i in range(10)]
    data = write_jsonl(tmp_path / "hydra.jsonl", records)
    config = TrainConfig(
        base_model="tiny", mixture=[{"path": data, "task": "from_records", "weight": 2.0}],
        adapter={"method": "rlora", "heads": 2, "rank": 2},
        training=dict(max_steps=2, batch_size=4, max_seq_len=32, eval_max_examples=4, eval_max_new_tokens=2, validation_share=0.1),
        output_dir=str(tmp_path / "out"),
    )
    from rlora.training.loop import load_mixture

    sources = {source.task: source for source in load_mixture(config)}
    assert set(sources) == {"default", "1"}
    # The entry's weight split by records: 30 and 10 of 40.
    assert sources["default"].weight == pytest.approx(1.5) and sources["1"].weight == pytest.approx(0.5)
    assert len(sources["default"].examples) + len(sources["default"].validation) == 30
    assert all(e.task == "1" for e in sources["1"].examples + sources["1"].validation)
    metrics = run(config, tiny_model_path)
    assert set(metrics["eval"]) == {"default", "1"}
    assert set(metrics["routing"]["by_task"]["tasks"]) == {"default", "1"}

    # A task no record carries names the entry.
    wrong = config.model_copy(update={"mixture": [config.mixture[0].model_copy(update={"task": "qa"})]})
    with pytest.raises(ValueError, match=r"mixture\[0\].task: no record carries task 'qa'"):
        load_mixture(wrong)
