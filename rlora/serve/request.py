"""One request inside the decode loop: what it asked for, what it has generated, and turning each
chosen token into text, stream events and, at the end, its `GenerationResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..adapter.diagnostics import routing_from_totals
from .adapters import LoadedAdapter
from .detokenize import IncrementalDecoder
from .handle import RequestHandle
from .params import GenerationParams, GenerationResult, StreamEvent, Token
from .sampling import TokenChooser
from .stopping import StopCriteria


@dataclass(eq=False)
class ActiveRequest:
    """A request the decode loop holds, from its submission to its end. Touched by the loop's
    thread only (the caller holds its `handle`)."""

    handle: RequestHandle
    params: GenerationParams
    adapter: LoadedAdapter | None
    prompt: list[int]
    prompt_text: str
    chooser: TokenChooser
    stopping: StopCriteria
    decoder: IncrementalDecoder
    generated: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    prefill: list[Token] = field(default_factory=list)
    text: str = ""  # concatenated text of the generated non-special tokens
    routing: dict[str, list] = field(default_factory=dict)  # path -> [weight sums, entropy sum, tokens]

    @property
    def wants_routing(self) -> bool:
        return self.params.details and self.adapter is not None and self.adapter.has_router

    def accept(self, token: int, logprob: float, special: bool) -> str | None:
        """Take the chosen ``token``: stream it, or return the finish reason it causes (the
        caller then finishes the request, which sends the last event)."""
        self.generated.append(token)
        text = self.decoder.add(token, special)
        reason = self.stopping.after_token(len(self.generated), token)
        if reason is not None and not special:
            text += self.decoder.held_back()  # the last token flushes what was held back
        item = Token(id=token, text=text, logprob=logprob, special=special)
        self.tokens.append(item)
        if not special and text:
            before = len(self.text)
            self.text += text
            if reason is None:
                reason = self.stopping.in_text(self.text, before)
        if reason is None:
            self.handle._emit(StreamEvent(index=len(self.generated), token=item))
        return reason

    def finish(self, reason: str) -> None:
        """Send the last event, with the result, and close the handle."""
        text = self.text  # the texts of the generated non-special tokens, stop text included
        if self.params.return_full_text:
            text = self.prompt_text + text
        result = GenerationResult(
            generated_text=text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt),
            generated_tokens=len(self.generated),
            seed=self.chooser.seed,
            tokens=self.tokens,
            prefill=self.prefill,
            routing=routing_from_totals(self.routing) if self.wants_routing else None,
            adapter_id=self.adapter.adapter_id if self.adapter else None,
        )
        self.handle._emit(StreamEvent(index=len(self.generated), token=self.tokens[-1], generated_text=text, result=result))
        self.handle._close(result=result)

    def record_prefill(self, logits: torch.Tensor, decode: Callable[[Sequence[int]], str], special_ids: set[int]) -> None:
        """The prompt's tokens with their log-probabilities (``decoder_input_details``), from the
        prefill's ``logits`` at the prompt's positions (len(prompt), vocab)."""
        ids = torch.tensor(self.prompt[1:], dtype=torch.long, device=logits.device)
        logprobs = torch.log_softmax(logits[:-1].float(), -1).gather(1, ids.unsqueeze(1)).squeeze(1).tolist() if len(self.prompt) > 1 else []
        self.prefill = [
            Token(id=t, text=decode([t]), logprob=None if j == 0 else logprobs[j - 1], special=t in special_ids)
            for j, t in enumerate(self.prompt)
        ]


@dataclass
class LogitsRow:
    """A row of `BaseModelRunner.logits`: an adapter, no request."""

    adapter: LoadedAdapter | None
    wants_routing: bool = False
