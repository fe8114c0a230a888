"""When a request stops, and why: TGI's finish reasons ``length``, ``eos_token`` and
``stop_sequence`` (the stop text is kept in the generated text, as TGI does)."""

from __future__ import annotations

from typing import AbstractSet, Sequence


class StopCriteria:
    """The stop conditions of one request: ``max_new_tokens``, the base model's eos ids (none
    with ``ignore_eos_token``) and the stop sequences."""

    def __init__(self, max_new_tokens: int, eos_ids: AbstractSet[int], stop: Sequence[str]):
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.stop = stop

    def after_token(self, generated: int, token: int) -> str | None:
        """The finish reason once ``token`` is the ``generated``-th token, None to go on."""
        if generated >= self.max_new_tokens:
            return "length"
        if token in self.eos_ids:
            return "eos_token"
        return None

    def in_text(self, text: str, new_from: int) -> str | None:
        """``stop_sequence`` when a stop sequence ends in ``text[new_from:]`` (the text the last
        token added; a stop may begin before it)."""
        for stop in self.stop:
            if text.find(stop, max(0, new_from - len(stop) + 1)) != -1:
                return "stop_sequence"
        return None
