"""Choosing each request's next token: greedy, or sampled after transformers' logits processors
(repetition penalty, temperature, top-k, top-p, in the order `generate` applies them).

`BatchSampler` chooses for all the rows of a decode step at once, on the device: each row's
parameters live in preallocated per-row tensors, so a step runs the same few batched kernels
whatever the mix of requests, with no per-row Python and no read-back.

Its draws are a counter-based random function rather than per-request `torch.Generator`s: the
noise for vocabulary index v at a row's d-th draw is splitmix64(key + v*G), with the draw's key
splitmix64(splitmix64(seed) + d*G) and G splitmix64's odd increment (see `_random_bits`), in 64-bit integer arithmetic done with torch int64 ops, which wrap. It is
turned into a uniform in the open interval (0, 1), then into Gumbel noise, and the token is the
argmax of the processed log-probabilities plus that noise (the Gumbel-max trick: a draw from their
softmax, and a -inf score is never chosen). The noise depends on nothing but (seed, d, v), so the
same seed gives the same tokens whatever else runs in the batch, at whichever row index the
request sits, without a generator per row.

Its tests hold it to transformers' own processors, row by row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .params import MAX_SEED, GenerationParams

# The scores are float32 (the decode loop casts the logits).
_FINFO = torch.finfo(torch.float32)


def _within_float32(value: float) -> float:
    return float(min(max(value, _FINFO.tiny), _FINFO.max))


# splitmix64's increment and multipliers, as the int64s with their bits (torch has no uint64 arithmetic).
def _as_int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


_GAMMA = _as_int64(0x9E3779B97F4A7C15)
_MIX_1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX_2 = _as_int64(0x94D049BB133111EB)


def _shift_right(bits: torch.Tensor, count: int) -> torch.Tensor:
    """Logical shift of int64 bit patterns: torch's ``>>`` is arithmetic, so the copied sign bits
    are masked off."""
    return (bits >> count) & ((1 << (64 - count)) - 1)


def _splitmix64(bits: torch.Tensor) -> torch.Tensor:
    bits = (bits ^ _shift_right(bits, 30)) * _MIX_1
    bits = (bits ^ _shift_right(bits, 27)) * _MIX_2
    return bits ^ _shift_right(bits, 31)


def _random_bits(seeds: torch.Tensor, draws: torch.Tensor, vocab_offsets: torch.Tensor) -> torch.Tensor:
    """64 random bits (int64) for each row's draw and each vocabulary index: ``seeds`` and
    ``draws`` (n,), ``vocab_offsets`` (vocab,) = index * G; returns (n, vocab)."""
    draw_keys = _splitmix64(_splitmix64(seeds) + draws * _GAMMA)
    return _splitmix64(draw_keys[:, None] + vocab_offsets)


def _gumbel_noise(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel noise, float64, from the top 52 bits: (k + 0.5) / 2**52 is a uniform in the open
    interval (0, 1), exact in float64, so neither logarithm sees 0 or 1."""
    uniform = (_shift_right(bits, 12).double() + 0.5) * 2.0**-52
    return -torch.log(-torch.log(uniform))


@dataclass(frozen=True)
class _Steps:
    """The processing steps a row needs; a plain greedy row needs none."""

    penalty: bool = False
    temperature: bool = False
    filters: bool = False  # top-k or top-p
    sampling: bool = False

    @classmethod
    def of(cls, params: GenerationParams) -> "_Steps":
        return cls(
            penalty=_penalty(params) is not None,
            temperature=_temperature(params) is not None,
            filters=bool(params.top_k) or _top_p(params) is not None,
            sampling=params.sampling,
        )

    def __bool__(self) -> bool:
        return self.penalty or self.temperature or self.filters or self.sampling


def _penalty(params: GenerationParams) -> float | None:
    if params.repetition_penalty is None or params.repetition_penalty == 1.0:
        return None
    return _within_float32(params.repetition_penalty)


def _temperature(params: GenerationParams) -> float | None:
    if params.temperature is None or params.temperature == 1.0:
        return None
    return _within_float32(params.temperature)


def _top_p(params: GenerationParams) -> float | None:
    return params.top_p if params.top_p is not None and params.top_p < 1.0 else None


class BatchSampler:
    """Per-row token choice for up to `rows` rows of one base model, as device tensors.

    Each processor's per-row value is 0 where the row does not use it (valid values are > 0): the
    repetition penalty, the temperature, top-k, and top-p's removed mass ``1 - top_p``. The
    host keeps which steps each occupied row needs, so a step skips what none of them use and
    plain greedy rows alone take argmax and log-softmax only."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device):
        self.rows = rows
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._samples = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self._penalty = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self._temperature = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self._top_k = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._removed_mass = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self._seed = torch.zeros(rows, dtype=torch.long, device=self.device)  # the seed's 64 bits
        self._draws = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._vocab_offsets = torch.arange(vocab_size, dtype=torch.long, device=self.device) * _GAMMA
        # (rows, vocab) ids seen so far, for the penalty; allocated for the first row with one.
        self._seen: torch.Tensor | None = None
        self._row_steps: dict[int, _Steps] = {}  # the occupied rows that need any step

    def set_row(self, row: int, params: GenerationParams, prompt: Sequence[int]) -> int | None:
        """Make `row` choose as `params` asks; returns the seed used when the request samples
        (params.seed, or one drawn with random.SystemRandom in 0..MAX_SEED when None — the
        caller reports it), else None. With a repetition penalty, the prompt's ids count as seen."""
        seed = None
        if params.sampling:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(MAX_SEED + 1)
        penalty, top_p = _penalty(params), _top_p(params)
        self._samples[row] = params.sampling
        self._penalty[row] = penalty or 0.0
        # The warpers need no `params.sampling` check: any of them turns sampling on.
        self._temperature[row] = _temperature(params) or 0.0
        self._top_k[row] = min(params.top_k or 0, self.vocab_size)
        self._removed_mass[row] = 1 - top_p if top_p is not None else 0.0
        self._seed[row] = _as_int64(seed or 0)
        self._draws[row] = 0
        if penalty is not None:
            self._mark_seen(row, prompt)
        self._keep_steps(row, _Steps.of(params))
        return seed

    def _mark_seen(self, row: int, prompt: Sequence[int]) -> None:
        if self._seen is None:
            self._seen = torch.zeros(self.rows, self.vocab_size, dtype=torch.bool, device=self.device)
        ids = torch.tensor(list(prompt), dtype=torch.long)
        # As transformers does, ids beyond the model's output vocabulary are left out.
        ids = ids[ids < self.vocab_size].to(self.device)
        self._seen[row] = False
        self._seen[row, ids] = True

    def _keep_steps(self, row: int, steps: _Steps) -> None:
        if steps:
            self._row_steps[row] = steps
        else:
            self._row_steps.pop(row, None)

    def free_row(self, row: int) -> None:
        """`row`'s request left: it no longer keeps the steps it needed on for the others."""
        self._row_steps.pop(row, None)

    def _table_steps(self) -> _Steps:
        needed = self._row_steps.values()
        return _Steps(
            penalty=any(steps.penalty for steps in needed),
            temperature=any(steps.temperature for steps in needed),
            filters=any(steps.filters for steps in needed),
            sampling=any(steps.sampling for steps in needed),
        )

    def process(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The scores each row chooses from: ``logits`` (n, vocab) float32 of table rows ``rows``
        after the row's processors, as `logits_processors` would give for that row alone."""
        return self._process(logits, rows, self._table_steps())

    def _process(self, logits: torch.Tensor, rows: torch.Tensor, steps: _Steps) -> torch.Tensor:
        scores = logits
        if steps.penalty:
            scores = self._apply_penalty(scores, rows)
        if steps.temperature:
            scores = self._apply_temperature(scores, rows)
        if steps.filters:
            scores = self._apply_filters(scores, rows)
        return scores

    def _apply_penalty(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """RepetitionPenaltyLogitsProcessor on the seen ids, then `_FiniteScores`."""
        penalty = self._penalty[rows].unsqueeze(1)
        penalized_rows = penalty > 0
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(penalized_rows & self._seen[rows], penalized, scores)
        finite = torch.nan_to_num(scores, nan=float("-inf"), posinf=_FINFO.max)
        return torch.where(penalized_rows, finite, scores)

    def _apply_temperature(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`_BestScoreAtZero` then TemperatureLogitsWarper."""
        temperature = self._temperature[rows].unsqueeze(1)
        tempered = (scores - scores.max(-1, keepdim=True).values) / temperature
        return torch.where(temperature > 0, tempered, scores)

    def _apply_filters(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """TopKLogitsWarper then TopPLogitsWarper, on one ascending sort: top-k's filtered scores
        are the smallest, so filling them with -inf keeps the order top-p sorts by."""
        top_k = self._top_k[rows].unsqueeze(1)
        removed_mass = self._removed_mass[rows].unsqueeze(1)
        ordered, order = scores.sort(-1)
        kth_largest = ordered.gather(1, (self.vocab_size - top_k).clamp(max=self.vocab_size - 1))
        below_top_k = (top_k > 0) & (ordered < kth_largest)
        ordered = ordered.masked_fill(below_top_k, float("-inf"))
        below_top_p = (removed_mass > 0) & (ordered.softmax(-1).cumsum(-1) <= removed_mass)
        below_top_p[:, -1] = False  # the best token is always kept
        removed = below_top_k | below_top_p
        return scores.masked_fill(removed.scatter(1, order, removed), float("-inf"))

    def choose(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (n, vocab) float32 of table rows `rows` (n,) long on the device; returns (tokens (n,) long,
        logprobs (n,) float32) on the device. Advances each sampling row's draw counter and marks the
        chosen tokens as seen (repetition penalty). No .item()/.tolist()/per-row Python loop inside."""
        steps = self._table_steps()
        scores = self._process(logits, rows, steps)
        logprobs = torch.log_softmax(scores, -1)
        tokens = scores.argmax(-1)
        if steps.sampling:
            noise = _gumbel_noise(_random_bits(self._seed[rows], self._draws[rows], self._vocab_offsets))
            tokens = torch.where(self._samples[rows], (logprobs.double() + noise).argmax(-1), tokens)
            self._draws[rows] += 1
        if steps.penalty:
            self._seen[rows, tokens] = True
        return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
