"""The dataset layer: reading and validation, the mixture sampler, tokenization and collation."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from collections import Counter

import pytest
import torch

from rlora.data import (
    IGNORE_INDEX,
    Collator,
    DatasetValidationError,
    Example,
    MixtureSampler,
    MixtureSource,
    RecordError,
    check_dataset,
    encode_example,
    load_dataset,
    prompt_ids,
    split_validation,
    steps_for_epochs,
    validate_dataset,
)
from rlora.tiny import _bytes_to_unicode, build_tokenizer

PROMPT_COMPLETION = {"prompt": "2+2=", "completion": "4", "task": "math"}
ALPACA = {"instruction": "Reverse", "input": "abc", "output": "cba", "task_type": "reverse"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
}


def jsonl(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def chat(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def errors_of(data, **kwargs) -> list[RecordError]:
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset(data, **kwargs)
    return info.value.errors


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The tiny tokenizer without a chat template: exercises the documented default format."""
    tok = build_tokenizer()
    tok.chat_template = None
    return tok


def labelled_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, l in zip(encoded["input_ids"], encoded["labels"]) if l != IGNORE_INDEX])


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_all_three_shapes_parse(fmt):
    records = [PROMPT_COMPLETION, ALPACA, CHAT, {"instruction": "Say hi", "output": "hi"}]
    data = jsonl(*records) if fmt == "jsonl" else json.dumps(records, indent=2).encode()
    examples, summary = validate_dataset(data)

    assert examples[0] == Example(prompt="2+2=", answer="4", task="math")
    assert examples[1] == Example(prompt="Reverse\n\nabc", answer="cba", task="reverse")
    assert examples[2].answer == "Hello" and examples[2].prompt == "Hi" and examples[2].task is None
    assert [m["role"] for m in examples[2].messages] == ["system", "user", "assistant"]
    assert examples[3].prompt == "Say hi"  # no input: the instruction alone
    assert summary.format == fmt
    assert summary.records == 4
    assert summary.shapes == {"prompt_completion": 1, "alpaca": 2, "chat": 1}
    assert summary.tasks == {"math": 1, "reverse": 1, "default": 2}


def test_reads_paths_with_blank_lines_and_bom(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(PROMPT_COMPLETION) + b"\n  \n" + jsonl(ALPACA))
    assert [e.answer for e in load_dataset(path)] == ["4", "cba"]
    assert [e.answer for e in load_dataset(str(path))] == ["4", "cba"]


@pytest.mark.parametrize(
    "data, line, field, text",
    [
        (jsonl(PROMPT_COMPLETION, PROMPT_COMPLETION, '{"prompt": "x", "completion": '), 3, None, "invalid JSON"),
        (jsonl(PROMPT_COMPLETION, {"prompt": "x"}), 2, "completion", "missing"),
        (jsonl({"instruction": "x", "output": "  "}), 1, "output", "non-empty"),
        (jsonl({"prompt": "x", "completion": 5}), 1, "completion", "must be a string, got number"),
        (jsonl(PROMPT_COMPLETION) + b'{"prompt": "\xff", "completion": "y"}\n', 2, None, "UTF-8"),
        (jsonl(PROMPT_COMPLETION, {"prompt": "x" * 300, "completion": "y"}), 2, None, "over the limit of 200"),
        (jsonl(chat(("bot", "x"), ("assistant", "y"))), 1, "messages[0].role", "must be one of"),
        (jsonl(chat(("assistant", "y"), ("user", "x"))), 1, "messages", "last message"),
        (jsonl(chat(("user", "x"), ("assistant", ""))), 1, "messages[1].content", "non-empty"),
        (jsonl(PROMPT_COMPLETION, [1, 2]), 2, None, "must be a JSON object, got array"),
        (jsonl({"question": "x", "answer": "y"}), 1, None, "unknown record shape"),
        (jsonl({"prompt": "x", "completion": "y", "output": "z"}), 1, None, "several shapes"),
        (jsonl({"prompt": "x", "completion": "y", "task": 3.5}), 1, "task", "must be a string or an integer, got number"),
        (jsonl({"prompt": "x", "completion": "y", "task_type": True}), 1, "task_type", "must be a string or an integer"),
        (jsonl({"prompt": "x", "completion": "y", "task": "t" * 101}), 1, "task", "at most 100 characters"),
    ],
)
def test_each_jsonl_problem_names_line_and_field(data, line, field, text):
    (error,) = errors_of(data, max_record_chars=200)
    assert (error.line, error.element, error.field) == (line, None, field)
    assert text in error.message


@pytest.mark.parametrize("data", [b"", b"  \n\n \t\n", b"[]", b" [ ] "])
def test_empty_file_is_an_error(data):
    (error,) = errors_of(data)
    assert error.line is None and "empty" in error.message


def test_json_array_errors_name_element_and_line():
    data = b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a"},\n  "text"\n]'
    errors = errors_of(data)
    assert [(e.element, e.line, e.field) for e in errors] == [(1, 3, "completion"), (2, 4, None)]


def test_json_array_syntax_error_reports_line():
    data = b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]'
    (error,) = errors_of(data)
    assert (error.element, error.line) == (1, 3) and "invalid JSON" in error.message


def test_json_array_non_utf8_reports_line():
    data = b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "\xc3\x28", "completion": "b"}\n]'
    (error,) = errors_of(data)
    assert error.line == 3 and "UTF-8" in error.message


def test_all_problems_in_a_file_are_reported():
    data = jsonl(PROMPT_COMPLETION, {"prompt": "x"}, "not json", PROMPT_COMPLETION, {"instruction": "", "output": 1})
    errors = errors_of(data)
    assert [(e.line, e.field) for e in errors] == [(2, "completion"), (3, None), (5, "instruction"), (5, "output")]


def test_error_cap_keeps_the_total_and_the_message_is_readable():
    data = jsonl(*[{"prompt": "x"}] * 30)
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset(data, max_errors=25)
    err = info.value
    assert len(err.errors) == 25 and err.total == 30
    assert str(err.errors[0]) == "line 1, field 'completion': missing"
    assert "30 problems" in str(err) and "... and 10 more" in str(err)
    assert str(err).count("line ") == 20
    copy = pickle.loads(pickle.dumps(err))
    assert copy.errors == err.errors and copy.total == 30


def test_array_read_in_small_chunks_keeps_lines_columns_and_long_elements(monkeypatch):
    import rlora.data.records as records

    monkeypatch.setattr(records, "_PEEK_BYTES", 3)  # every element and escape crosses a chunk's end
    long = {"prompt": "\u00e9" * 80, "completion": "x"}
    data = json.dumps([PROMPT_COMPLETION, long, {"prompt": "a"}, ALPACA]).encode()
    errors = errors_of(data, max_record_chars=90)
    assert [(e.line, e.element, e.field) for e in errors] == [(1, 1, None), (1, 2, "completion")]
    assert errors[0].message == f"record is {len(json.dumps(long))} characters, over the limit of 90"
    (error,) = errors_of(b'[\n {"prompt": "a",\n  "completion" "b"}]')
    assert (error.line, error.element, error.message) == (3, 0, "invalid JSON: Expecting ':' delimiter (column 16)")


def test_checking_keeps_no_records_and_a_long_line_is_never_held(tmp_path):
    record = json.dumps(PROMPT_COMPLETION)
    path = tmp_path / "big.json"
    path.write_text("[" + ",".join([record] * 100_000) + "]")
    tracemalloc.start()
    try:
        summary = check_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.records == 100_000 and summary.tasks == {"math": 100_000}
    assert peak < 2 * 1024 * 1024  # the file is 4.5 MB; its records parsed would be far more

    line = json.dumps({"prompt": "x" * 5_000_000, "completion": "y"})
    path.write_text(f"{record}\n{line}\n{record}\n")
    tracemalloc.start()
    try:
        (error,) = errors_of(path, max_record_chars=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (error.line, error.message) == (2, f"record is {len(line)} characters, over the limit of 1000")
    assert peak < 1024 * 1024


# --------------------------------------------------------------------------- mixture


def examples(task: str, count: int) -> list[Example]:
    return [Example(prompt=f"{task}{i}", answer=str(i), task=None) for i in range(count)]


def sampler(seed: int = 0, weights=(1.0, 3.0)) -> MixtureSampler:
    sources = [MixtureSource(examples("a", 7), weights[0], "a"), MixtureSource(examples("b", 11), weights[1], "b")]
    return MixtureSampler(sources, seed=seed)


def test_mixture_follows_weights():
    counts = Counter(task for task, _ in sampler().next_batch(4000))
    assert abs(counts["b"] / 4000 - 0.75) < 0.03


def test_mixture_source_task_wins_and_each_epoch_sees_every_example_once():
    source = MixtureSource([Example("p", str(i), task="record-task") for i in range(5)], 1.0, "mix-task")
    draws = MixtureSampler([source], seed=3).next_batch(15)
    assert {task for task, _ in draws} == {"mix-task"}
    passes = [[e.answer for _, e in draws[i : i + 5]] for i in (0, 5, 10)]
    assert all(sorted(p) == ["0", "1", "2", "3", "4"] for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes


def test_mixture_is_seeded():
    def run(seed):
        return [(t, e.prompt) for t, e in sampler(seed).next_batch(200)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_mixture_state_resumes_exactly():
    first = sampler()
    first.next_batch(37)
    state = json.loads(json.dumps(first.state_dict()))
    expected = first.next_batch(50)

    resumed = sampler()
    resumed.load_state_dict(state)
    assert resumed.next_batch(50) == expected
    assert resumed.epochs == first.epochs and resumed.drawn == 87
    with pytest.raises(ValueError, match="seed"):
        sampler(seed=5).load_state_dict(state)


def test_mixture_rejects_bad_weights():
    with pytest.raises(ValueError, match="source 1"):
        sampler(weights=(1.0, 0.0))
    with pytest.raises(ValueError, match="source 0"):
        sampler(weights=(-2.0, 1.0))


def test_split_validation_is_deterministic_and_partitions():
    data = examples("x", 50)
    train, val = split_validation(data, 0.1, seed=4)
    assert (train, val) == split_validation(data, 0.1, seed=4)
    assert val != split_validation(data, 0.1, seed=5)[1]
    assert len(val) == 5 and sorted(train + val, key=data.index) == data
    assert len(split_validation(data[:3], 0.01, seed=0)[1]) == 1
    assert split_validation(data[:1], 0.5, seed=0) == (data[:1], [])
    assert split_validation(data, 0.0, seed=0) == (data, [])


def test_steps_for_epochs():
    sources = [MixtureSource(examples("a", 7), 1.0, "a"), MixtureSource(examples("b", 11), 3.0, "b")]
    assert steps_for_epochs(sources, 1, 4) == 5  # ceil(18 / 4)
    assert steps_for_epochs(sources, 2.5, 9) == 5
    assert steps_for_epochs([MixtureSource(examples("a", 30), 1.0, "a")], 0.1, 3) == 1


# --------------------------------------------------------------------------- tokenization


def test_labels_cover_only_the_answer_and_eos(tokenizer):
    for example in (Example("What is 2+2?", "four", None), validate_dataset(jsonl(ALPACA))[0][0]):
        encoded = encode_example(tokenizer, example, 256)
        assert labelled_text(tokenizer, encoded) == example.answer + "<|eos|>"
        assert encoded["input_ids"][0] == tokenizer.bos_token_id
        assert encoded["input_ids"].count(tokenizer.bos_token_id) == 1
        prompt = prompt_ids(tokenizer, example)
        assert encoded["input_ids"][: len(prompt)] == prompt
        assert set(encoded["labels"][: len(prompt)]) == {IGNORE_INDEX}
    assert "Reverse\n\nabc" in tokenizer.decode(encode_example(tokenizer, example, 256)["input_ids"])


def test_default_format_without_chat_template(plain_tokenizer):
    encoded = encode_example(plain_tokenizer, Example("Q", "A", None), 64)
    assert plain_tokenizer.decode(encoded["input_ids"]) == "<|bos|>Q\nA<|eos|>"
    assert labelled_text(plain_tokenizer, encoded) == "A<|eos|>"
    assert plain_tokenizer.decode(prompt_ids(plain_tokenizer, Example("Q", "A", None))) == "<|bos|>Q\n"


def test_answer_span_survives_a_merge_across_the_boundary():
    """A tokenizer that merges the prompt's last byte with the answer's first: the prompt's
    tokens are then not a prefix of the full sequence, and the common prefix is used."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab[chars[10] + "a"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(chars[10], "a")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|eos|>"])
    merging = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")

    encoded = encode_example(merging, Example("q", "abc", None), 64)
    assert encoded["input_ids"][1] == 256  # "\na" is one token
    assert encoded["labels"][0] == IGNORE_INDEX
    assert labelled_text(merging, encoded) == "\nabc<|eos|>"


def test_chat_labels_only_assistant_turns(tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "second answer"},
        ]
    }
    example = validate_dataset(jsonl(record))[0][0]
    encoded = encode_example(tokenizer, example, 512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    segments, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    segments.append(tokenizer.decode(current))
    assert segments == ["first answer<|eos|>", "second answer<|eos|>"]
    prompt = prompt_ids(tokenizer, example)
    assert tokenizer.decode(prompt).endswith("second question<|eos|><|assistant|>")
    assert ids[: len(prompt)] == prompt


def labelled_segments(tokenizer, encoded) -> list[str]:
    segments, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    return segments + ([tokenizer.decode(current)] if current else [])


def test_an_assistant_turn_of_weight_0_is_context_not_learned(tokenizer):
    # OpenAI's chat format for fine-tuning: "weight": 0 on an assistant message.
    record = {
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "a poor answer", "weight": 0},
            {"role": "user", "content": "try again"},
            {"role": "assistant", "content": "a good answer", "weight": 1},
        ]
    }
    example = validate_dataset(jsonl(record))[0][0]
    assert example.messages[1]["weight"] == 0 and "weight" not in example.messages[3]
    encoded = encode_example(tokenizer, example, 512)
    assert labelled_segments(tokenizer, encoded) == ["a good answer<|eos|>"]
    assert "a poor answer" in tokenizer.decode(encoded["input_ids"])  # still in the context
    record["messages"][1]["weight"], record["messages"][3]["weight"] = 1, 0
    encoded = encode_example(tokenizer, validate_dataset(jsonl(record))[0][0], 512)
    assert labelled_segments(tokenizer, encoded) == ["a poor answer<|eos|>"]


@pytest.mark.parametrize(
    "messages, field, text",
    [
        ([{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}], "messages[0].weight", "only for assistant"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}], "messages[1].weight", "0 or 1"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": True}], "messages[1].weight", "0 or 1"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}], "messages", "nothing to learn"),
    ],
)
def test_bad_weights_are_refused(messages, field, text):
    (error,) = errors_of(jsonl({"messages": messages}))
    assert error.field == field and text in error.message


def test_truncation_drops_the_prompt_first(tokenizer):
    example = Example("x" * 100 + "END", "the answer", None)
    encoded = encode_example(tokenizer, example, 24)
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == 24
    assert encoded["input_ids"][0] == tokenizer.bos_token_id
    assert labelled_text(tokenizer, encoded) == "the answer<|eos|>"
    assert "END<|eos|><|assistant|>" in tokenizer.decode(encoded["input_ids"])


def test_truncation_cuts_the_end_of_a_long_answer(tokenizer):
    encoded = encode_example(tokenizer, Example("question", "0123456789" * 5, None), 16)
    assert len(encoded["input_ids"]) == 16
    assert labelled_text(tokenizer, encoded) == "0123456789" + "01234"  # bos + 15 answer bytes
    assert prompt_ids(tokenizer, Example("question", "a", None), max_len=5)[0] == tokenizer.bos_token_id
    assert len(prompt_ids(tokenizer, Example("question", "a", None), max_len=5)) == 5


def test_no_labelled_token_left_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no answer tokens"):
        encode_example(tokenizer, Example("question", "answer", None), 1)


def test_collator_pads_right_with_mask(tokenizer):
    features = [encode_example(tokenizer, Example("q", "long answer", None), 64),
                encode_example(tokenizer, Example("q", "a", None), 64)]
    batch = Collator(tokenizer.pad_token_id)(features)
    long, short = (len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, long)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1].tolist() == features[1]["input_ids"] + [tokenizer.pad_token_id] * (long - short)
    assert batch["labels"][1, short:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(dim=1).tolist() == [long, short]
    assert batch["attention_mask"][1, :short].eq(1).all()


def test_collator_pads_to_a_fixed_width(tokenizer):
    features = [encode_example(tokenizer, Example("q", "a", None), 64)]
    length = len(features[0]["input_ids"])
    batch = Collator(tokenizer.pad_token_id, width=32)(features)
    assert batch["input_ids"].shape == (1, 32) and batch["attention_mask"].sum() == length
    with pytest.raises(ValueError, match="does not fit"):
        Collator(tokenizer.pad_token_id, width=length - 1)(features)


# --- task labels: strings, integers, none; a mixture entry's tasks ----------------------


def test_task_labels_may_be_integers_or_empty():
    from rlora.data import validate_dataset

    records = [
        {"instruction": "a", "input": "", "output": "x", "task_type": ""},
        {"instruction": "b", "input": "", "output": "y", "task_type": 1},
        {"prompt": "c", "completion": "z", "task": "  "},
        {"prompt": "d", "completion": "w", "task": None},
        {"prompt": "e", "completion": "v", "task": 0},
    ]
    examples, summary = validate_dataset(jsonl(*records))
    assert [e.task for e in examples] == [None, "1", None, None, "0"]
    assert summary.tasks == {"default": 3, "1": 1, "0": 1}


def test_entry_tasks_follow_the_records_labels():
    from rlora.data.mixture import FROM_RECORDS, TaskNotInRecords, entry_tasks

    hydra = {"default": 1265, "1": 300}
    assert entry_tasks(hydra, FROM_RECORDS) == {"default": "default", "1": "1"}
    assert entry_tasks(hydra, "1") == {"1": "1"}  # only the records labelled 1
    assert entry_tasks({"default": 40}, "add") == {"add": "default"}  # an unlabelled file is the entry's task
    with pytest.raises(TaskNotInRecords, match="no record carries task 'qa'.*'1'"):
        entry_tasks(hydra, "qa")
