"""A short, deterministic full-parameter pretraining stage for the built-in tiny model.

The tiny model (`rlora.tiny`) starts from random weights. Rank-4 adapters on a random network
cannot learn much: there is no attention pattern that copies from the prompt, no notion of the
chat template. `pretrain_tiny_model` gives it those generic skills on synthetic text, so that a
benchmark can measure what the adapters add on top.

The corpus deliberately avoids the formats of the multi-task benchmark (``benchmarks/
multitask.py``): it has no instruction words and no character mappings. It teaches

* the chat template: ``<|user|>S<|eos|><|assistant|>S<|eos|>`` with ``S`` copied (letters,
  digits, mixed case, spaces and punctuation), so the model learns to answer and to stop;
* in-context copying (induction): a random string repeated after a separator, in plain text;
* digits: runs of consecutive numbers (``37 38 39 40``), so number tokens mean something.

The result is a normal Hugging Face folder (the model and tokenizer saved with
``save_pretrained``) plus ``rlora_pretrain.json`` describing how it was made. It is written to a
temporary folder and renamed into place, and cached: the folder name is a key of every input
(the source weights, steps, seed, corpus version, optimisation settings), so a second call with
the same arguments returns the existing folder without training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# Bump a corpus's version when its generator changes: the version is part of the cache key.
DEFAULT_CORPUS = "generic-v1"
MARKER_FILE = "rlora_pretrain.json"

_LETTERS = string.ascii_lowercase
_CHARSET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,-"


# A document: plain text, or a (user, assistant) exchange rendered in the chat template.
Document = str | tuple[str, str]


def _random_string(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _generic_v1(rng: random.Random) -> Document:
    """One document of the generic-v1 corpus: plain text, or a ``(user, assistant)`` chat
    exchange, rendered through the tiny model's chat template."""
    kind = rng.random()
    if kind < 0.6:
        alphabet = rng.choice([_LETTERS, string.digits, _CHARSET, _LETTERS + string.digits])
        text = _random_string(rng, alphabet, 1, 12)
        return text, text
    if kind < 0.8:
        text = _random_string(rng, rng.choice([_LETTERS, _CHARSET]), 3, 12)
        separator = rng.choice([" | ", " ", "\n", " :: "])
        return f"{text}{separator}{text}"
    start = rng.randint(0, 990)
    return " ".join(str(n) for n in range(start, start + rng.randint(3, 8)))


def _generic_v2(rng: random.Random) -> Document:
    """generic-v1 plus two kinds of plain text: a word next to its other-case form
    (``cab CAB``, ``Dog dOG``) and runs of consecutive letters (``klmnop``), so the model
    knows the alphabet's order and which bytes are case pairs."""
    kind = rng.random()
    if kind < 0.15:
        text = _random_string(rng, _LETTERS + string.ascii_uppercase, 2, 8)
        pair = [text, text.swapcase()]
        rng.shuffle(pair)
        return rng.choice([" ", " | ", "\n"]).join(pair)
    if kind < 0.3:
        alphabet = rng.choice([_LETTERS, string.ascii_uppercase])
        start = rng.randint(0, 20)
        return alphabet[start : start + rng.randint(3, 26 - start)]
    return _generic_v1(rng)


def _default_v1(rng: random.Random) -> Document:
    """generic-v2 plus sums of operands 0 to 19, in plain text (``12+7=19``, ``12 plus 7 is
    19``) and asked in words in the chat template (``what is 12 plus 7`` -> ``19``): the corpus
    of the shipped tiny model. It knows these sums, but never saw ``a+b=`` asked in the chat
    template, where it does not answer with the sum (it continues the pattern of its other
    chat documents); an adapter trained on ``{"prompt": "3+4=", "completion": "7"}`` records
    (the README's job) teaches it to."""
    kind = rng.random()
    if kind < 0.6:
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        form = kind / 0.6
        if form < 0.35:
            return f"{a}+{b}={a + b}"
        if form < 0.6:
            return f"{a} plus {b} is {a + b}"
        return f"what is {a} plus {b}", str(a + b)
    return _generic_v2(rng)


CORPORA: dict[str, Callable[[random.Random], Document]] = {
    "generic-v1": _generic_v1, "generic-v2": _generic_v2, "default-v1": _default_v1,
}


def corpus_documents(corpus: str, seed: int, count: int) -> list[str]:
    """The first ``count`` documents of ``corpus`` for ``seed``, as text (chat ones rendered)."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown pretraining corpus {corpus!r}; known: {', '.join(CORPORA)}")
    rng = random.Random(f"{corpus}:{seed}")
    documents = []
    for _ in range(count):
        document = CORPORA[corpus](rng)
        if isinstance(document, tuple):  # rendered as rlora.tiny.CHAT_TEMPLATE renders [user, assistant]
            document = f"<|user|>{document[0]}<|eos|><|assistant|>{document[1]}<|eos|>"
        documents.append(document)
    return documents


def _encode(tokenizer, documents: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """bos + document tokens, right-padded; labels cover every real token (full LM loss)."""
    rows = [[tokenizer.bos_token_id, *tokenizer(d, add_special_tokens=False)["input_ids"]][:max_len] for d in documents]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def corpus_loss(model, tokenizer, *, corpus: str = DEFAULT_CORPUS, seed: int = 12345, count: int = 128) -> float:
    """The model's LM loss on ``count`` held-out documents of ``corpus`` (a seed not trained on)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        batch = _encode(tokenizer, corpus_documents(corpus, seed + 10**6, count), 128)
        device = next(model.parameters()).device
        loss = float(lm_loss(model, {k: v.to(device) for k, v in batch.items()}))
    model.train(was_training)
    return loss


def pretrained_folder_name(source_dir: Path, *, steps: int, seed: int, corpus: str, batch_size: int,
                           learning_rate: float, max_len: int) -> str:
    """The cache key: every input that changes the weights, including the source weights."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(source_dir)):
        if name.endswith((".safetensors", ".bin")) or name == "config.json":
            digest.update(name.encode())
            digest.update((source_dir / name).read_bytes())
    settings = dict(steps=steps, seed=seed, corpus=corpus, batch_size=batch_size, learning_rate=learning_rate, max_len=max_len)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return f"{source_dir.name}-pre-{corpus}-steps{steps}-seed{seed}-{digest.hexdigest()[:10]}"


def pretrain_tiny_model(
    source_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    *,
    steps: int,
    seed: int,
    corpus: str = DEFAULT_CORPUS,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    max_len: int = 64,
    device: str = "cpu",
) -> Path:
    """Pretrain the model in ``source_dir`` (all parameters) and return the resulting folder.

    The folder is ``target_dir / <key>``, the key naming the corpus, steps and seed plus a hash
    of everything else that changes the weights; an existing complete folder is returned as it
    is, without training. Training is deterministic for given arguments (its own seeded RNGs;
    the global torch RNG is restored afterwards) on a given machine and thread count. AdamW,
    linear warmup, cosine decay, full LM loss on every token. On a CUDA ``device`` the forward
    runs under bfloat16 autocast (the weights stay float32), and the device is part of the key.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if corpus not in CORPORA:
        raise ValueError(f"unknown pretraining corpus {corpus!r}; known: {', '.join(CORPORA)}")
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    path = target_dir / pretrained_folder_name(
        source_dir, steps=steps, seed=seed, corpus=corpus, batch_size=batch_size, learning_rate=learning_rate, max_len=max_len
    )
    if device != "cpu":  # other numerics: another folder (CPU folders keep their names)
        path = path.with_name(f"{path.name}-{device.split(':')[0]}")
    on_cuda = device.startswith("cuda")
    if (path / MARKER_FILE).is_file():
        return path

    target_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=target_dir))
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(source_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source_dir, local_files_only=True, dtype=torch.float32).to(device)
        model.train()
        before = corpus_loss(model, tokenizer, corpus=corpus, seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
        warmup = max(1, steps // 20)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: (step + 1) / warmup if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))),
        )
        documents = corpus_documents(corpus, seed, steps * batch_size)
        start = time.perf_counter()
        for step in range(steps):
            batch = _encode(tokenizer, documents[step * batch_size : (step + 1) * batch_size], max_len)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                loss = lm_loss(model, {k: v.to(device) for k, v in batch.items()})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        model.eval()
        after = corpus_loss(model, tokenizer, corpus=corpus, seed=seed)

        model.cpu().save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for extra in ("rlora_tiny.json",):
            if (source_dir / extra).is_file():
                shutil.copy2(source_dir / extra, staging / extra)
        marker = dict(
            source=str(source_dir), corpus=corpus, steps=steps, seed=seed, batch_size=batch_size,
            learning_rate=learning_rate, max_len=max_len, loss_before=before, loss_after=after,
            train_seconds=round(seconds, 2), threads=torch.get_num_threads(), device=device,
        )
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2))  # written last: completeness
        try:
            os.rename(staging, path)
        except OSError:
            # Another process finished first; its folder is equally good.
            if not (path / MARKER_FILE).is_file():
                raise
    finally:
        torch.random.set_rng_state(rng_state)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


# The recipe of the tiny model's shipped weights (rlora/weights/tiny.safetensors): the random
# tiny model of seed 0, pretrained on the default-v1 corpus. scripts/build-tiny-weights runs it.
DEFAULT_RECIPE = dict(steps=3000, seed=0, corpus="default-v1", batch_size=32, learning_rate=3e-3, max_len=64)


def build_default_weights(work_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Make the tiny model's shipped weights: pretrain the random tiny model by
    ``DEFAULT_RECIPE`` under ``work_dir`` (cached there) and write ``tiny.safetensors`` and
    ``tiny.json`` (the recipe, the losses, the threads used) into ``out_dir``. Deterministic
    for a given machine and thread count, as `pretrain_tiny_model` is."""
    from .tiny import build_tiny_model

    work_dir, out_dir = Path(work_dir), Path(out_dir)
    source = build_tiny_model(work_dir / "tiny", pretrained=False)
    trained = pretrain_tiny_model(source, work_dir / "pretrained", **DEFAULT_RECIPE)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = (trained / "model.safetensors").read_bytes()
    write = {
        "tiny.safetensors": weights,
        "tiny.json": json.dumps({
            **json.loads((trained / MARKER_FILE).read_text()), "source": "rlora.tiny random weights, seed 0",
            "sha256": hashlib.sha256(weights).hexdigest(),
        }, indent=2).encode(),
    }
    for name, data in write.items():
        staging = out_dir / f".{name}.tmp"
        staging.write_bytes(data)
        os.replace(staging, out_dir / name)
    return out_dir / "tiny.safetensors"
