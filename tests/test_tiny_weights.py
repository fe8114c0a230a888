"""The tiny model's shipped, pretrained weights: they load, the folder is rebuilt when its
weights are other ones, and the model knows what its pretraining taught (sums in words, in
the chat template) while it does not yet answer the README's ``3+4=`` format."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlora.tiny import MARKER_FILE, PRETRAINED_WEIGHTS, build_tiny_model


def greedy(path, text: str, tokens: int = 4) -> str:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(tokenizer.bos_token + text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_shipped_weights_are_small_and_described():
    assert PRETRAINED_WEIGHTS.is_file() and PRETRAINED_WEIGHTS.stat().st_size < 10 * 2**20
    recipe = json.loads(PRETRAINED_WEIGHTS.with_suffix(".json").read_text())
    assert recipe["corpus"] == "default-v1" and recipe["loss_after"] < recipe["loss_before"]


def test_the_pretrained_tiny_model_adds_in_words_but_not_in_the_readme_format(tiny_model_path):
    chat = "<|user|>{}<|eos|><|assistant|>"
    answers = [greedy(tiny_model_path, chat.format(f"what is {a} plus {b}")) for a, b in [(3, 4), (12, 7), (15, 19)]]
    assert answers == ["7", "19", "34"]
    assert greedy(tiny_model_path, chat.format("3+4=")) != "7"  # what the README's job teaches


def test_a_folder_of_other_weights_is_replaced(tmp_path):
    random_model = build_tiny_model(tmp_path / "tiny", pretrained=False)
    assert json.loads((random_model / MARKER_FILE).read_text()) == {"seed": 0}
    pretrained = build_tiny_model(tmp_path / "tiny")
    assert pretrained == random_model and json.loads((pretrained / MARKER_FILE).read_text())["weights"].startswith("pretrained:")
    weights = AutoModelForCausalLM.from_pretrained(pretrained).state_dict()
    from safetensors.torch import load_file

    shipped = load_file(PRETRAINED_WEIGHTS)
    assert all(torch.equal(weights[name], tensor) for name, tensor in shipped.items())
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"], "nothing left behind"


def test_the_readme_job_teaches_the_default_model_to_add(tiny_model_path, tmp_path):
    """The README walkthrough's job (its data and settings), by the library: over 80% exact
    match on the held-out problems, where the base model gets almost none."""
    from rlora.training import TrainConfig, train

    data = tmp_path / "add.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b), "task": "add"}) + "\n"
                            for a in range(20) for b in range(20)))
    config = TrainConfig(
        base_model="tiny", mixture=[{"path": str(data), "weight": 1.0, "task": "add"}],
        adapter={"method": "rlora", "heads": 3, "rank": 4},
        training={"max_steps": 300, "batch_size": 8, "max_seq_len": 64, "learning_rate": 3e-3, "device": "cpu"},
        output_dir=str(tmp_path / "out"),
    )
    metrics = train(config, cache_dir=tiny_model_path.parent)
    assert metrics["eval"]["add"]["examples"] == 40 and metrics["eval"]["add"]["accuracy"] >= 0.8, metrics["eval"]
