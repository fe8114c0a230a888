"""Incremental detokenisation: the text each new token adds, as TGI computes it."""

from __future__ import annotations

from typing import Callable, Sequence

# How many prompt tokens before the first generated one are decoded with it: enough context
# for tokenizers whose decoding of a token depends on the ones before it (TGI uses 5).
_CONTEXT_TOKENS = 5


class IncrementalDecoder:
    """The text of one request's generated tokens, token by token.

    A token adds the text of (its context + it) beyond the text of its context, and nothing until
    the bytes of a character are complete (no trailing U+FFFD). Special tokens give their own
    text and stay out of the text stream. ``decode`` turns ids into text, special tokens kept."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt: Sequence[int]):
        self._decode = decode
        self._ids = list(prompt)  # the prompt and the non-special generated tokens
        self._prefix_offset = max(len(prompt) - _CONTEXT_TOKENS, 0)
        self._read_offset = len(prompt)

    def add(self, token: int, special: bool) -> str:
        """The text ``token`` adds."""
        if special:
            return self._decode([token])
        self._ids.append(token)
        prefix, new = self._texts()
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return new[len(prefix) :]
        return ""

    def held_back(self) -> str:
        """The text held back so far (an incomplete character), given out at the end."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix, new = self._texts()
        return new[len(prefix) :]

    def _texts(self) -> tuple[str, str]:
        """The text of the context already read, and of it with the tokens after it."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return prefix, self._decode(self._ids[self._prefix_offset :])
