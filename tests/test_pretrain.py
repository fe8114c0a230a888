"""The tiny model's pretraining stage: deterministic, cached, atomic, and it learns its corpus."""

import os

import pytest
import torch
from safetensors.torch import load_file

from rlora.pretrain import MARKER_FILE, corpus_documents, corpus_loss, pretrain_tiny_model

SMALL = dict(steps=12, seed=3, batch_size=8, max_len=48)


@pytest.fixture(scope="module")
def pretrained(random_tiny_model_path, tmp_path_factory):
    """One small pretraining run shared by the tests: (target_dir, result path)."""
    target = tmp_path_factory.mktemp("pretrained")
    return target, pretrain_tiny_model(random_tiny_model_path, target, **SMALL)


def _weights(path):
    return load_file(path / "model.safetensors")


def test_result_is_a_normal_hf_folder(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = pretrained
    assert (path / MARKER_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tokenizer.chat_template


def test_deterministic(random_tiny_model_path, pretrained, tmp_path):
    _, first = pretrained
    torch.manual_seed(12345)  # the global RNG must not matter
    second = pretrain_tiny_model(random_tiny_model_path, tmp_path, **SMALL)
    assert second.name == first.name
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_other_seed_gives_other_folder_and_weights_and_leaves_global_rng(random_tiny_model_path, pretrained, tmp_path):
    _, first = pretrained
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    other = pretrain_tiny_model(random_tiny_model_path, tmp_path, **{**SMALL, "seed": 4, "steps": 3})
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    assert other.name != first.name
    assert not torch.equal(_weights(first)["lm_head.weight"], _weights(other)["lm_head.weight"])


def test_cached_second_call_does_not_retrain(random_tiny_model_path, pretrained, monkeypatch):
    target, path = pretrained
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("the cached folder was retrained")

    monkeypatch.setattr("rlora.pretrain.lm_loss", refuse)
    again = pretrain_tiny_model(random_tiny_model_path, target, **SMALL)
    assert again == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps


def test_atomic_no_temporary_folders_left(pretrained):
    target, path = pretrained
    assert [p for p in target.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in target.iterdir()] == [path.name]


def test_failure_leaves_nothing_behind(random_tiny_model_path, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("rlora.pretrain.lm_loss", explode)
    with pytest.raises(RuntimeError, match="boom"):
        pretrain_tiny_model(random_tiny_model_path, tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_lowers_lm_loss_on_its_corpus(random_tiny_model_path, pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = pretrained
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    before = corpus_loss(AutoModelForCausalLM.from_pretrained(random_tiny_model_path), tokenizer, count=64)
    after = corpus_loss(AutoModelForCausalLM.from_pretrained(path), tokenizer, count=64)
    assert after < before - 0.5, (before, after)


def test_corpus_is_deterministic_and_versioned():
    assert corpus_documents("generic-v1", 0, 20) == corpus_documents("generic-v1", 0, 20)
    assert corpus_documents("generic-v1", 0, 20) != corpus_documents("generic-v1", 1, 20)
    with pytest.raises(ValueError, match="unknown pretraining corpus"):
        corpus_documents("nope", 0, 1)


def test_rejects_bad_arguments(random_tiny_model_path, tmp_path):
    with pytest.raises(ValueError):
        pretrain_tiny_model(random_tiny_model_path, tmp_path, steps=0, seed=0)
    with pytest.raises(ValueError, match="unknown pretraining corpus"):
        pretrain_tiny_model(random_tiny_model_path, tmp_path, steps=1, seed=0, corpus="nope")
    assert not os.listdir(tmp_path)
