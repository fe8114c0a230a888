"""Tokenization: examples to token ids with loss on the answer tokens only, and padding."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from .records import Example

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy (and HF models) skip

# Every example is tokenized as a conversation: prompt/completion and Alpaca records become
# [user: prompt, assistant: answer]. With a chat template the tokenizer's template renders it;
# without one the documented default renders each user/system turn as f"{content}\n" and each
# assistant turn as its content followed by the eos token, so prompt/completion reads
# f"{prompt}\n{answer}<eos>". The bos token, when the tokenizer has one, is put first unless
# the rendered text already starts with it (templates such as Llama's include it; the tiny
# model's does not). The labelled tokens of an assistant turn are found by tokenizing the
# conversation up to that turn (with the generation prompt) and through it, and taking the
# common prefix with the whole conversation's tokens, which holds even when the tokenizer
# merges across the boundary; an assistant turn of ``weight`` 0 (OpenAI's chat format) is
# context, left unlabelled. Each such turn costs a render and a tokenization of the
# conversation so far, so turns are taken from the last one back and only while truncation
# keeps them: a conversation of hundreds of turns costs a few of those, not one per turn.


def encode_example(tokenizer: Any, example: Example, max_seq_len: int) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one example; labels are ``IGNORE_INDEX`` except on the
    assistant turns' tokens and their end token (eos, or the template's end of turn).

    Over ``max_seq_len`` tokens, the context before the final answer is dropped from the left
    (after the bos token), then if the answer alone is still too long its end is cut. Raises
    ValueError when no labelled token is left, which the trainer counts as a skipped example.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    messages = _conversation(example)
    unprefixed = _token_ids(tokenizer, _render(tokenizer, messages, add_generation_prompt=False))
    input_ids = with_bos(tokenizer, unprefixed)
    offset = len(input_ids) - len(unprefixed)
    head = _bos_count(tokenizer, input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    spans = ((learned, offset + start, offset + end) for learned, start, end in _assistant_spans(tokenizer, messages, unprefixed))
    learned, answer_start, answer_end = next(spans, (False, len(input_ids), len(input_ids)))
    if learned:
        labels[answer_start:answer_end] = input_ids[answer_start:answer_end]
    first_kept = _first_kept(len(input_ids), answer_start, head, max_seq_len)
    for learned, start, end in spans:
        if end <= first_kept:
            break  # truncation drops this turn and every one before it
        if learned:
            labels[start:end] = input_ids[start:end]
    input_ids, labels = _truncate(input_ids, labels, answer_start, head, max_seq_len)
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"example has no answer tokens within max_seq_len={max_seq_len}")
    return {"input_ids": input_ids, "labels": labels}


def prompt_ids(tokenizer: Any, example: Example, max_len: int | None = None) -> list[int]:
    """The ids a model is given to generate ``example.answer``: everything before the final
    assistant turn, with the generation prompt; the same tokens ``encode_example`` puts before
    the answer. Over ``max_len``, the oldest tokens after bos are dropped."""
    context = _conversation(example)[:-1]
    ids = with_bos(tokenizer, _token_ids(tokenizer, chat_prompt(tokenizer, context)))
    return ids if max_len is None else keep_last(tokenizer, ids, max_len)


def chat_prompt(tokenizer: Any, messages: Sequence[dict]) -> str:
    """The text a model is given to answer ``messages`` (``{"role", "content"}``: system, user,
    assistant): the conversation rendered as training renders it, with the generation prompt,
    so a model trained on chat records is asked as it was taught. Without a bos token (the
    engine puts it first, as it does for every prompt)."""
    return _render(tokenizer, [dict(m) for m in messages], add_generation_prompt=True)


def keep_last(tokenizer: Any, ids: Sequence[int], max_len: int) -> list[int]:
    """The last ``max_len`` of ``ids``, the leading bos (if any) kept first among them: the
    model always saw bos first, and the newest context matters most for what comes next."""
    if len(ids) <= max_len:
        return list(ids)
    head = _bos_count(tokenizer, ids)
    return list(ids[:head]) + list(ids[len(ids) - max(max_len - head, 0) :])


def with_bos(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """``ids`` with the tokenizer's bos token first, unless it is there already or there is
    none. Exposed so that generation from raw text follows the same convention."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):
        return list(ids)
    return [bos, *ids]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (len(rows), longest row) int64 on ``device``: each
    row right-aligned after ``pad_id`` padding, mask 1 on its tokens. Decoder-only generation
    pads on the left, so that every row's next token follows its last real one."""
    if not rows:
        raise ValueError("cannot pad an empty batch")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _bos_count(tokenizer: Any, ids: Sequence[int]) -> int:
    """1 when ``ids`` starts with bos: truncation keeps it, as the model always saw it first."""
    return int(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)


class Collator:
    """Pads a batch of ``encode_example`` outputs (right padding) to its longest member, or to
    ``width`` when one is given: compiled layers run at one static shape, where every new
    length would be a recompilation."""

    def __init__(self, pad_token_id: int, width: int | None = None):
        self.pad_token_id = pad_token_id
        self.width = width

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(feature["input_ids"]) for feature in features)
        if self.width is not None and longest > self.width:
            raise ValueError(f"an example of {longest} tokens does not fit the batch width {self.width}")
        width = self.width or longest
        shape = (len(features), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _conversation(example: Example) -> list[dict]:
    if example.messages is not None:
        return [dict(message) for message in example.messages]
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]


def _render(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    return "".join(m["content"] + (eos if m["role"] == "assistant" else "\n") for m in messages)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assistant_spans(tokenizer: Any, messages: list[dict], full: list[int]) -> Iterator[tuple[bool, int, int]]:
    """``[start, end)`` of each assistant turn within ``full`` (its content and end token),
    the last turn first, and whether it is learned (not ``weight`` 0); turns that add no token
    are left out."""
    for index in reversed(range(len(messages))):
        if messages[index]["role"] != "assistant":
            continue
        before = _token_ids(tokenizer, _render(tokenizer, messages[:index], add_generation_prompt=True))
        through = _token_ids(tokenizer, _render(tokenizer, messages[: index + 1], add_generation_prompt=False))
        start, end = _common_prefix(before, full), _common_prefix(through, full)
        if end > start:
            yield messages[index].get("weight") != 0, start, end


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _truncate(
    ids: list[int], labels: list[int], answer_start: int, head: int, max_len: int
) -> tuple[list[int], list[int]]:
    """Fit ``max_len``: drop context tokens after the first ``head`` (bos) ones, oldest first,
    but not past ``answer_start``; then cut the end."""
    if len(ids) <= max_len:
        return ids, labels
    drop = _first_kept(len(ids), answer_start, head, max_len) - head
    ids = ids[:head] + ids[head + drop :]
    labels = labels[:head] + labels[head + drop :]
    return ids[:max_len], labels[:max_len]


def _first_kept(length: int, answer_start: int, head: int, max_len: int) -> int:
    """The first token after the ``head`` (bos) ones that `_truncate` keeps of ``length``."""
    return head + min(max(length - max_len, 0), max(answer_start - head, 0))
