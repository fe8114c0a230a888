"""`BatchSampler`: batched processing equals transformers' processors row by row, and its
counter-based draws are reproducible per request and follow the processed distribution."""

import pytest
import torch

from rlora.serve.params import MAX_SEED, GenerationParams
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlora.serve.sampling import _FINFO, BatchSampler, _gumbel_noise, _random_bits, _within_float32

VOCAB = 40

# A batch mixing every processor, alone and together, with extreme values.
MIXED = {
    "greedy": GenerationParams(),
    "greedy penalty": GenerationParams(repetition_penalty=1.3),
    "greedy huge penalty": GenerationParams(repetition_penalty=1e300),
    "greedy tiny penalty": GenerationParams(repetition_penalty=1e-30),
    "do_sample": GenerationParams(do_sample=True, seed=5),
    "temperature": GenerationParams(temperature=0.7, seed=1),
    "tiny temperature": GenerationParams(temperature=1e-300, seed=6),
    "huge temperature": GenerationParams(temperature=1e30, seed=7),
    "top_k": GenerationParams(top_k=5, seed=2),
    "top_k beyond vocab": GenerationParams(top_k=1000, seed=8),
    "top_p": GenerationParams(top_p=0.8, seed=3),
    "tiny top_p": GenerationParams(top_p=1e-9, seed=9),
    "everything": GenerationParams(temperature=1.5, top_k=10, top_p=0.9, repetition_penalty=1.2, seed=4),
    "penalty and temperature": GenerationParams(temperature=0.3, repetition_penalty=2.5, seed=10),
}


# The reference: one request's processors as transformers' `generate` would run them.


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


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return torch.device(request.param)


def assert_same_scores(actual, expected):
    """Bitwise on the CPU; on CUDA transformers divides by a scalar as a multiply by its reciprocal."""
    tolerance = {"rtol": 0, "atol": 0} if actual.device.type == "cpu" else {}
    torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance)


def reference_scores(params, seen, logits):
    ids = torch.tensor([seen], dtype=torch.long, device=logits.device)
    return logits_processors(params)(ids, logits.unsqueeze(0).clone()).squeeze(0)


def mixed_logits(generator, names, device):
    """Random scores; extreme ones, on the prompt's first ids, where a penalty pushes them out of float32."""
    logits = torch.randn(len(names), VOCAB, generator=generator) * 3
    logits[names.index("greedy tiny penalty")] *= 1e37  # divided by 1e-30: +inf, fixed to the largest float
    logits[names.index("greedy huge penalty"), :5] = torch.tensor([3e38, -3e38, 1e38, -1e38, 0.0])
    return logits.to(device)


def test_processed_scores_and_choices_match_transformers_row_by_row(device):
    generator = torch.Generator().manual_seed(0)
    names = list(MIXED)
    table_rows = torch.randperm(len(names) + 3, generator=generator)[: len(names)]
    sampler = BatchSampler(len(names) + 3, VOCAB, device)
    seen = {}
    for name, row in zip(names, table_rows.tolist()):
        prompt = [0, 1, 2, 3, 4] + torch.randint(0, VOCAB, (4,), generator=generator).tolist() + [VOCAB + 2]
        sampler.set_row(row, MIXED[name], prompt)
        seen[name] = prompt
    rows = table_rows.to(device)
    for _ in range(4):
        logits = mixed_logits(generator, names, device)
        processed = sampler.process(logits, rows)
        tokens, logprobs = sampler.choose(logits, rows)
        for i, name in enumerate(names):
            expected = reference_scores(MIXED[name], seen[name], logits[i])
            assert_same_scores(processed[i], expected)
            token = int(tokens[i])
            assert torch.isfinite(expected[token]), name
            if not MIXED[name].sampling:
                assert token == int(expected.argmax()), name
            torch.testing.assert_close(logprobs[i], torch.log_softmax(expected, -1)[token])
            seen[name].append(token)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32


def draw(sampler, row, logits_steps, rows=None, other_logits=None):
    """The tokens `row` draws at each step, beside `rows`' other rows (given `other_logits`)."""
    tokens = []
    rows = rows if rows is not None else [row]
    for step, logits in enumerate(logits_steps):
        batch = torch.stack([logits if r == row else other_logits[step] for r in rows])
        chosen, _ = sampler.choose(batch, torch.tensor(rows, device=batch.device))
        tokens.append(int(chosen[rows.index(row)]))
    return tokens


def test_same_seed_same_tokens_at_any_row_beside_any_rows(device):
    generator = torch.Generator().manual_seed(1)
    params = GenerationParams(temperature=0.9, top_k=20, seed=1234)
    steps = (torch.randn(12, VOCAB, generator=generator) * 2).to(device)
    others = (torch.randn(12, VOCAB, generator=generator) * 2).to(device)

    alone = BatchSampler(1, VOCAB, device)
    alone.set_row(0, params, [1, 2])
    expected = draw(alone, 0, steps)

    crowded = BatchSampler(6, VOCAB, device)
    crowded.set_row(2, GenerationParams(do_sample=True, seed=99), [3])
    crowded.set_row(0, GenerationParams(repetition_penalty=1.5), [3])
    crowded.set_row(5, GenerationParams(top_p=0.5, seed=1234), [3])  # the same seed, other params
    crowded.set_row(4, params, [1, 2])
    first = draw(crowded, 4, steps[:5], rows=[2, 4, 0, 5], other_logits=others)
    rest = draw(crowded, 4, steps[5:], rows=[4, 0], other_logits=others)  # others left the batch
    assert first + rest == expected


def test_different_seeds_draw_different_tokens(device):
    sampler = BatchSampler(2, VOCAB, device)
    for row, seed in enumerate((7, 8)):
        sampler.set_row(row, GenerationParams(do_sample=True, seed=seed), [])
    flat = torch.zeros(2, VOCAB, device=device)
    rows = torch.arange(2, device=device)
    draws = torch.stack([sampler.choose(flat, rows)[0] for _ in range(10)], 1)
    assert not torch.equal(draws[0], draws[1])


def draw_counts(device, params_of_row, logits, steps):
    """How often each token is drawn by `params_of_row(row)` rows, all with `logits`."""
    rows = 500
    sampler = BatchSampler(rows, len(logits), device)
    for row in range(rows):
        sampler.set_row(row, params_of_row(row), [])
    batch = logits.to(device).expand(rows, -1).contiguous()
    indices = torch.arange(rows, device=device)
    tokens = torch.cat([sampler.choose(batch, indices)[0] for _ in range(steps)])
    return torch.bincount(tokens.cpu(), minlength=len(logits)), sampler.process(batch, indices)[0].cpu()


def chi_square(counts, probabilities):
    expected = probabilities * counts.sum()
    kept = probabilities > 0
    return float((((counts - expected) ** 2)[kept] / expected[kept]).sum()), int(kept.sum()) - 1


# The 0.999 quantile of the chi-square distribution by degrees of freedom.
CHI_SQUARE_999 = {3: 16.27, 5: 20.52}


@pytest.mark.parametrize(
    "params_of_row",
    [
        lambda row: GenerationParams(do_sample=True, seed=row),
        lambda row: GenerationParams(temperature=0.6, top_k=4, seed=MAX_SEED - row),
    ],
    ids=["softmax", "temperature and top-k"],
)
def test_draws_follow_the_processed_distribution(device, params_of_row):
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0])
    counts, processed = draw_counts(device, params_of_row, logits, steps=40)
    probabilities = torch.softmax(processed.double(), -1)
    statistic, degrees = chi_square(counts.double(), probabilities)
    assert statistic < CHI_SQUARE_999[degrees], (counts, probabilities)
    assert counts[probabilities == 0].sum() == 0


def test_masked_tokens_are_never_drawn(device):
    logits = torch.tensor([0.0, float("-inf"), 0.5, float("-inf"), 0.2, -0.1, 3.0, 2.9])
    counts, processed = draw_counts(device, lambda row: GenerationParams(top_p=0.9, seed=row), logits, steps=10)
    assert counts[logits == float("-inf")].sum() == 0
    assert counts[processed == float("-inf")].sum() == 0
    assert counts[6] > 0 and counts[7] > 0  # what top-p keeps is drawn


def test_top_k_one_is_greedy(device):
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(2)).to(device)
    sampler = BatchSampler(8, VOCAB, device)
    for row in range(8):
        sampler.set_row(row, GenerationParams(top_k=1, seed=row), [])
    tokens, logprobs = sampler.choose(logits, torch.arange(8, device=device))
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(logprobs, torch.zeros_like(logprobs))


def test_reported_seed_is_drawn_when_missing_and_reproduces(device):
    steps = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(3)).to(device)
    sampler = BatchSampler(3, VOCAB, device)
    assert sampler.set_row(0, GenerationParams(), []) is None
    assert sampler.set_row(1, GenerationParams(do_sample=True, seed=MAX_SEED), []) == MAX_SEED
    drawn = sampler.set_row(2, GenerationParams(temperature=0.8), [])
    assert isinstance(drawn, int) and 0 <= drawn <= MAX_SEED
    tokens = draw(sampler, 2, steps)

    again = BatchSampler(1, VOCAB, device)
    assert again.set_row(0, GenerationParams(temperature=0.8, seed=drawn), []) == drawn
    assert draw(again, 0, steps) == tokens


def test_fast_path_follows_the_occupied_rows_and_agrees_with_the_general_path(device):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4)).to(device)
    rows = torch.arange(3, device=device)
    sampler = BatchSampler(4, VOCAB, device)
    for row in range(3):
        sampler.set_row(row, GenerationParams(), [])
    assert sampler.process(logits, rows) is logits  # argmax and log-softmax only
    fast = sampler.choose(logits, rows)

    sampler.set_row(3, GenerationParams(top_k=3, repetition_penalty=2.0, seed=0), [0, 1, 2])
    assert sampler.process(logits, rows) is not logits
    general = sampler.choose(logits, rows)
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
    assert torch.equal(fast[0], logits.argmax(-1))

    sampler.free_row(3)  # the sampling row's request left
    assert sampler.process(logits, rows) is logits


def splitmix64(value):
    mask = 2**64 - 1
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & mask
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & mask
    return value ^ (value >> 31)


def test_random_bits_are_splitmix64_of_seed_draw_and_vocabulary_index(device):
    """The noise is the documented function of (seed, draw, index) in unsigned 64-bit
    arithmetic: torch's int64 ops wrap and its arithmetic shifts are masked."""
    gamma, mask = 0x9E3779B97F4A7C15, 2**64 - 1
    seeds = [0, 1, 2**63 - 1, 2**63, MAX_SEED]
    draws = [0, 1, 7, 2**40, 3]
    signed = lambda value: value - 2**64 if value >= 2**63 else value
    offsets = torch.arange(5, device=device) * signed(gamma)
    bits = _random_bits(
        torch.tensor([signed(s) for s in seeds], device=device), torch.tensor(draws, device=device), offsets
    )
    for i, (seed, draw_index) in enumerate(zip(seeds, draws)):
        key = splitmix64((splitmix64(seed) + draw_index * gamma) & mask)
        expected = [signed(splitmix64((key + v * gamma) & mask)) for v in range(5)]
        assert bits[i].tolist() == expected
    # The extreme bit patterns still give finite noise: the uniform excludes 0 and 1.
    assert torch.isfinite(_gumbel_noise(torch.tensor([0, -1], device=device))).all()


@pytest.mark.gpu
def test_cuda_draws_the_tokens_the_cpu_draws():
    steps = torch.randn(10, VOCAB, generator=torch.Generator().manual_seed(5)) * 2
    tokens = {}
    for name in ("cpu", "cuda"):
        sampler = BatchSampler(1, VOCAB, torch.device(name))
        sampler.set_row(0, GenerationParams(temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=42), [1])
        tokens[name] = draw(sampler, 0, steps.to(name))
    assert tokens["cpu"] == tokens["cuda"]
