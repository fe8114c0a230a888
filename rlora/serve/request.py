"""One request inside a runner, from admission to its end.

Two threads touch it, each its own fields: the decode loop (its slots, how far its prompt is in
the cache, how many tokens it has generated, the routing it recorded, handed to the output
thread as a snapshot with each token) and the output thread (its text, tokens, events and
result, see ``output.py``). The loop decides the stops it can see
from token ids (length, eos); the output thread the stop sequences, which need the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..adapter.diagnostics import routing_from_totals
from .adapters import LoadedAdapter
from .detokenize import IncrementalDecoder
from .handle import RequestHandle
from .params import GenerationParams, GenerationResult, StreamEvent, Token
from .stopping import StopCriteria


@dataclass(eq=False)
class ActiveRequest:
    handle: RequestHandle
    params: GenerationParams
    adapter: LoadedAdapter | None
    prompt: list[int]
    prompt_text: str
    stopping: StopCriteria
    decoder: IncrementalDecoder
    tenant: str = ""  # whose request: queues and caps are per tenant
    submitted_at: float = field(default_factory=time.monotonic)  # for the time to its first token
    # The decode loop's.
    slot: int = -1  # its row of the KV cache and of the sampler
    adapter_slot: int = -1  # its adapter's slot in the tables (-1: none)
    prefilled: int = 0  # prompt tokens in the cache
    length: int = 0  # tokens in the cache once decoding (the next one is written there)
    generated_count: int = 0
    reserved_tokens: int = 0  # of its tenant's token allowance (TenantQueues)
    prefill_alone: bool = False  # a pass with it failed: it is prefilled on its own from now on
    seed: int | None = None
    prompt_logprobs: list[float] = field(default_factory=list)  # decoder_input_details
    routing: dict[str, tuple] = field(default_factory=dict)  # path -> (weight sums, entropy sum, tokens)
    # The output thread's.
    generated: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    prefill: list[Token] = field(default_factory=list)
    text: str = ""  # concatenated text of the generated non-special tokens

    @property
    def wants_routing(self) -> bool:
        return self.params.details and self.adapter is not None and self.adapter.has_router

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    def count(self, token: int) -> str | None:
        """(Loop) One more token chosen: the finish reason it causes by length or eos, if any."""
        self.generated_count += 1
        return self.stopping.after_token(self.generated_count, token)

    def accept(self, token: int, logprob: float, special: bool, reason: str | None, routing: dict | None = None) -> bool | str:
        """(Output thread) Take the chosen ``token`` (``reason``: the loop's finish reason; ``routing``:
        the loop's routing totals up to this token): stream it, or finish the request when it ends
        it, by the loop's reason or a stop sequence. False when the request had ended already (the
        token is dropped), the finish reason when this token ended it, else True."""
        if self.handle.done():
            return False  # finished by a stop sequence while the loop ran a step more, or cancelled
        self.generated.append(token)
        text = self.decoder.add(token, special)
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
            return True
        self._finish(reason, routing)
        return reason

    def _finish(self, reason: str, routing: dict | None) -> None:
        """Send the last event, with the result, and close the handle."""
        text = self.text  # the texts of the generated non-special tokens, stop text included
        if self.params.return_full_text:
            text = self.prompt_text + text
        result = GenerationResult(
            generated_text=text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt),
            generated_tokens=len(self.generated),
            seed=self.seed,
            tokens=self.tokens,
            prefill=self.prefill,
            routing=routing_from_totals(routing) if self.wants_routing and routing is not None else None,
            adapter_id=self.adapter.adapter_id if self.adapter else None,
        )
        self.handle._emit(StreamEvent(index=len(self.generated), token=self.tokens[-1], generated_text=text, result=result))
        self.handle._close(result=result)

    def record_prefill(self, decode: Callable[[Sequence[int]], str], special_ids: set[int]) -> None:
        """(Output thread) The prompt's tokens with their log-probabilities
        (``decoder_input_details``), from ``prompt_logprobs`` the loop gathered."""
        logprobs = [None] + self.prompt_logprobs
        self.prefill = [Token(id=t, text=decode([t]), logprob=lp, special=t in special_ids) for t, lp in zip(self.prompt, logprobs)]
