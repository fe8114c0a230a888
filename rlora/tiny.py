"""The built-in tiny base model: a small Llama-architecture causal LM with a byte-level tokenizer.

It is written as an ordinary Hugging Face folder, so everything that loads real models
(``AutoModelForCausalLM``, ``AutoTokenizer``) loads it too, offline. It is the embedded default
base model of the service and the model the test suite trains.

Its weights are the pretrained ones shipped with the package (``weights/tiny.safetensors``,
made by ``scripts/build-tiny-weights`` with `rlora.pretrain.build_default_weights`: a short
deterministic pretraining on synthetic text, sums in words included), so that an adapter on
it can learn a small skill in a minute; ``pretrained=False`` gives the random initialisation
(seeded), which is what that pretraining starts from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "tiny"

# Byte-level vocabulary: the 256 bytes, then the special tokens. Every text round-trips.
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# A chat template in the model's own special tokens, so `messages` records tokenize the same
# way a chat model's would.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TINY_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # Order the alphabet by byte value, so token id == byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map, which ByteLevel uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PRETRAINED_WEIGHTS = WEIGHTS_DIR / "tiny.safetensors"  # the package's pretrained tiny model
MARKER_FILE = "rlora_tiny.json"  # which weights a built folder holds


def _weights_digest() -> str:
    return hashlib.sha256(PRETRAINED_WEIGHTS.read_bytes()).hexdigest()


def build_tiny_model(path: str | os.PathLike, seed: int = 0, *, pretrained: bool = True) -> Path:
    """Write the tiny model and its tokenizer to ``path`` (atomically) and return the path.

    ``pretrained``: the weights shipped with the package (``seed`` is not used); otherwise a
    random initialisation that depends only on ``seed``. An existing complete folder with the
    same weights is left as it is; one with other weights (a random tiny model built by an
    earlier version, say) is replaced.
    """
    # Imported here, as build_tokenizer does: naming the tiny model (the service's model list)
    # needs neither torch nor transformers.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    marker = {"weights": f"pretrained:{_weights_digest()}"} if pretrained else {"seed": seed}
    if (path / "tokenizer.json").exists() and _marker(path) == marker:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
        finally:
            torch.random.set_rng_state(generator_state)
        if pretrained:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(PRETRAINED_WEIGHTS), strict=True)
        model.config.name_or_path = TINY_MODEL_NAME
        model.save_pretrained(staging, safe_serialization=True)
        build_tokenizer().save_pretrained(staging)
        (staging / MARKER_FILE).write_text(json.dumps(marker))
        _move_into_place(staging, path, marker)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _move_into_place(staging: Path, path: Path, marker: dict) -> None:
    """``staging`` renamed to ``path``; a folder of other weights there is moved aside first."""
    if path.exists() and _marker(path) != marker:
        outdated = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        try:
            os.rename(path, outdated / path.name)
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(outdated, ignore_errors=True)
    try:
        os.rename(staging, path)
    except OSError:
        # Another process finished first; its folder is equally good.
        if _marker(path) != marker:
            raise
