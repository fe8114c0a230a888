"""Choosing each request's next token: greedy, or sampled through transformers' logits
processors (repetition penalty, temperature, top-k, top-p, in the order `generate` applies them).

A request's choice never depends on the rest of the batch: sampling draws from the request's own
seeded generator, so the same seed gives the same tokens whatever else runs beside it.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .params import MAX_SEED, GenerationParams

# The scores are float32 (the decode loop casts the logits).
_FINFO = torch.finfo(torch.float32)


class _FiniteScores(LogitsProcessor):
    """After an extreme (valid) repetition penalty: a score pushed to +inf is capped to the
    largest float and a NaN becomes -inf, so the softmax stays a distribution."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return torch.nan_to_num(scores, nan=float("-inf"), posinf=_FINFO.max)


class _BestScoreAtZero(LogitsProcessor):
    """Shifts the best score to 0 before the temperature divides (the softmax does not change):
    a tiny temperature then sends the other scores to -inf rather than the best to +inf (NaN)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores - scores.max(-1, keepdim=True).values


def _within_float32(value: float) -> float:
    return float(min(max(value, _FINFO.tiny), _FINFO.max))


def logits_processors(params: GenerationParams) -> LogitsProcessorList:
    """The processors of one request; empty when it chooses by plain argmax. The warpers only
    when sampling (TGI: any warper turns sampling on, see `GenerationParams.sampling`)."""
    processors = LogitsProcessorList()
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        processors += [RepetitionPenaltyLogitsProcessor(_within_float32(params.repetition_penalty)), _FiniteScores()]
    if params.sampling:
        if params.temperature is not None and params.temperature != 1.0:
            processors += [_BestScoreAtZero(), TemperatureLogitsWarper(_within_float32(params.temperature))]
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))  # it caps top_k at the vocabulary
        if params.top_p is not None and params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


class TokenChooser:
    """How one request picks its tokens. With sampling on it owns the request's generator, seeded
    by ``params.seed`` or, without one, by a drawn seed (``seed``, reported in the details).
    With a repetition penalty it keeps the ids seen so far (the prompt and the chosen tokens)."""

    def __init__(self, params: GenerationParams, prompt: Sequence[int]):
        self.sampling = params.sampling
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if self.sampling:
            self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(MAX_SEED + 1)
            self.generator = torch.Generator().manual_seed(self.seed)
        self.processors = logits_processors(params)
        self._seen = list(prompt) if self.processors else None

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw scores: the batch's plain greedy rows are chosen together."""
        return not self.sampling and not self.processors

    def choose(self, scores: torch.Tensor) -> tuple[int, float]:
        """The token for ``scores`` (vocab,) float32, and its log-probability under the
        processed distribution."""
        if self.processors:
            seen = torch.tensor([self._seen], dtype=torch.long, device=scores.device)
            scores = self.processors(seen, scores.unsqueeze(0)).squeeze(0)
        logprobs = torch.log_softmax(scores, -1)
        if self.sampling:
            token = int(torch.multinomial(logprobs.exp().cpu(), 1, generator=self.generator))
        else:
            token = int(scores.argmax())
        if self._seen is not None:
            self._seen.append(token)
        return token, float(logprobs[token])


def choose_tokens(choosers: Sequence[TokenChooser], logits: torch.Tensor) -> list[tuple[int, float]]:
    """``(token, logprob)`` of each row of ``logits`` (B, vocab) by its row's chooser."""
    chosen: list[tuple[int, float] | None] = [None] * len(choosers)
    plain = [i for i, chooser in enumerate(choosers) if chooser.plain_greedy]
    if plain:
        rows = logits.index_select(0, torch.tensor(plain, device=logits.device))
        ids = rows.argmax(-1)
        logprobs = torch.log_softmax(rows, -1).gather(1, ids.unsqueeze(1)).squeeze(1)
        for i, token, logprob in zip(plain, ids.tolist(), logprobs.tolist()):
            chosen[i] = (token, logprob)
    for i, chooser in enumerate(choosers):
        if chosen[i] is None:
            chosen[i] = chooser.choose(logits[i])
    return chosen  # type: ignore[return-value]
