"""training.compile: the decoder layers compiled, against the eager trainer.

On CPU the compiled runs use the "aot_eager" backend (`compiled_with_aot_eager`): it traces
and runs the same per-layer graphs through dynamo and AOT autograd as inductor does, without
inductor's C++ compilation (about 90 s from a cold cache on the 2-core test machine). The GPU
test compiles with inductor, the default.
"""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import rlora.training.loop
from rlora.training import TrainConfig, TrainingSettings, read_train_config
from rlora.training.checkpoint import latest_checkpoint
from rlora.training.config import field_path
from test_trainer import Crash, adapter_tensors, datasets, make_config, run  # noqa: F401 - datasets is a fixture

# Loss of the compiled run against the eager one: the graphs are the eager ops, but batches
# are padded to max_seq_len when compiled, so matmuls of another shape round differently.
LOSS_RTOL = 1e-4


@pytest.fixture
def compiled_with_aot_eager(monkeypatch):
    monkeypatch.setattr(rlora.training.loop, "_COMPILE_BACKEND", "aot_eager")


def losses(metrics):
    return [point["loss"] for point in metrics["train_loss"]]


def test_compiled_run_matches_the_eager_run(datasets, tmp_path, tiny_model_path, compiled_with_aot_eager):
    # Without dropout: masks are drawn per position of the padded batch, and the compiled run's
    # batches are wider, so its draws would land on other tokens than the eager run's.
    def config(name, **training):
        settings = dict(max_steps=6, gradient_accumulation_steps=2, checkpoint_every=3, **training)
        config = make_config(datasets, tmp_path / name, **settings)
        config.adapter["dropout"] = 0.0
        return config

    eager = run(config("eager"), tiny_model_path)  # compile "auto", the default: off on CPU
    compiled = run(config("compiled", compile="on"), tiny_model_path)

    assert eager["compiled"] is False and compiled["compiled"] is True
    assert losses(compiled) == pytest.approx(losses(eager), rel=LOSS_RTOL)
    assert losses(compiled)[-1] < losses(compiled)[0]
    # Same names in the adapter and the checkpoints (no "_orig_mod."), values within rounding.
    eager_adapter, compiled_adapter = adapter_tensors(tmp_path / "eager"), adapter_tensors(tmp_path / "compiled")
    assert list(compiled_adapter) == list(eager_adapter)
    for name, tensor in compiled_adapter.items():
        torch.testing.assert_close(tensor, eager_adapter[name], rtol=1e-3, atol=1e-5)
    checkpoint_names = [
        list(load_file(latest_checkpoint(tmp_path / name) / "adapter.safetensors")) for name in ("eager", "compiled")
    ]
    assert checkpoint_names[1] == checkpoint_names[0]
    # Evaluation and routing run (eagerly) on the compiled model.
    assert set(compiled["eval"]) == {"reverse", "answer"}
    assert compiled["routing"]["per_layer"].keys() == eager["routing"]["per_layer"].keys()


def test_compiled_run_resumes_exactly(datasets, tmp_path, tiny_model_path, compiled_with_aot_eager):
    def config(name):
        return make_config(datasets, tmp_path / name, max_steps=6, checkpoint_every=2, compile="on",
                           gradient_checkpointing=True)

    straight = run(config("straight"), tiny_model_path)

    def crash_at_step_3(progress):
        if progress.step == 3:
            raise Crash()  # the last checkpoint is step 2

    with pytest.raises(Crash):
        run(config("resumed"), tiny_model_path, on_progress=crash_at_step_3)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000002"
    resumed = run(config("resumed"), tiny_model_path)

    assert resumed["compiled"] is True
    assert losses(resumed) == losses(straight)
    straight_adapter = adapter_tensors(tmp_path / "straight")
    for name, tensor in adapter_tensors(tmp_path / "resumed").items():
        assert torch.equal(tensor, straight_adapter[name]), name


def test_compile_setting_values(tmp_path):
    assert TrainingSettings().compile == "auto"
    assert TrainingSettings(compile=True).compile == "on"
    assert TrainingSettings(compile=False).compile == "off"
    # YAML 1.1 reads unquoted on/off as booleans; they mean the same words.
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "base_model: tiny\nmixture: [{path: data.jsonl, task: t}]\noutput_dir: out\ntraining: {compile: off}\n"
    )
    assert read_train_config(config_file).training.compile == "off"
    with pytest.raises(ValidationError) as caught:
        TrainConfig(base_model="tiny", mixture=[{"path": "d.jsonl", "task": "t"}], output_dir="out",
                    training={"compile": "sometimes"})
    assert [field_path(e["loc"]) for e in caught.value.errors()] == ["training.compile"]
    config_file.write_text(json.dumps({"base_model": "tiny", "mixture": [{"path": "d.jsonl", "task": "t"}],
                                       "output_dir": "out", "training": {"compile": 1.5}}))
    with pytest.raises(ValueError, match=r"training\.compile: "):
        read_train_config(config_file)


@pytest.mark.gpu
def test_auto_compiles_on_cuda_in_bfloat16_and_learns(datasets, tmp_path, tiny_model_path):
    config = make_config(datasets, tmp_path / "out", max_steps=40, learning_rate=3e-2, checkpoint_every=10)
    config.mixture.pop(0)  # only the constant-answer task
    metrics = run(config, tiny_model_path)
    assert metrics["compiled"] is True
    curve = losses(metrics)
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:3]) / 3, curve
