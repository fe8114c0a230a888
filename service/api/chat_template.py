"""Chat messages as the prompt text of a base model: rendered in the API process with the base
model's tokenizer (loaded once per process; no model weights), by the same function training
renders chat records with (`rlora.data.chat_prompt`), so the engine, in this process or another,
receives text as for any prompt."""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

from rlora.basemodels import resolve_base_model
from rlora.data import chat_prompt

from service.settings import Settings

_lock = threading.Lock()


@lru_cache(maxsize=16)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def render_chat(settings: Settings, base_model: str, messages: list[dict[str, str]]) -> str:
    """The prompt of ``messages`` for ``base_model``. Blocking (the first call per base model
    loads its tokenizer): call it from a thread."""
    path = str(resolve_base_model(base_model, settings.models_dir, settings.cache_dir))
    with _lock:  # one load per tokenizer, and templates rendered one at a time
        return chat_prompt(_tokenizer(path), messages)
