"""Shapes and masks of the forward passes a runner makes: the bucketed sizes of a decode step
(a few distinct shapes, so each can be captured once), the inputs of a prefill chunk, and the
additive attention masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def bucket(needed: int, limit: int, smallest: int = 1) -> int:
    """The power of two (at least ``smallest``) that holds ``needed``, capped at ``limit``."""
    size = smallest
    while size < needed:
        size *= 2
    return min(size, limit)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, 1, Q, K) bool mask (True: may attend) as the additive float mask that eager and
    SDPA attention take as it is, in every transformers version."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def decode_mask(positions: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, width): row i attends to its cache positions [0, positions[i]] (its new token
    included). A slot that is not decoding writes to the scratch column past ``width`` and so
    sees every column: never an empty attention row (NaN in some SDPA kernels)."""
    columns = torch.arange(width, device=positions.device)
    return additive_mask((columns <= positions.unsqueeze(1))[:, None, None, :], dtype)


def prefill_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool for a left-padded batch without a cache, token mask ``mask`` (B, T) bool:
    causal over real tokens; a padding query sees itself only, so no attention row is empty."""
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    full = causal.unsqueeze(0) & mask.unsqueeze(1)
    full |= torch.eye(width, dtype=torch.bool, device=mask.device).unsqueeze(0)
    return full.unsqueeze(1)


def prefill_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts from 0 at its first real token."""
    return (mask.long().cumsum(1) - 1).clamp_min(0)


@dataclass
class PrefillChunk:
    """The tensors of one prefill forward: row i feeds ``tokens[i]`` (left-padded to T) of its
    prompt from position ``starts[i]`` into cache slot ``slots[i]``."""

    ids: torch.Tensor  # (B', T) long
    position_ids: torch.Tensor  # (B', T) long: real tokens' positions; padding repeats the first
    write_positions: torch.Tensor  # (B', T) long: where each token's keys go (scratch for padding)
    token_mask: torch.Tensor  # (B', T) bool
    attention: torch.Tensor  # (B', 1, T, width) bool
    slots: torch.Tensor  # (B',) long
    width: int  # cache positions attended: max(start + len)


def prefill_chunk(
    tokens: Sequence[Sequence[int]], starts: Sequence[int], slots: Sequence[int], pad_id: int, scratch: int, device: torch.device
) -> PrefillChunk:
    batch, width_t = len(tokens), max(len(t) for t in tokens)
    ids = torch.full((batch, width_t), pad_id, dtype=torch.long)
    token_mask = torch.zeros(batch, width_t, dtype=torch.bool)
    for i, chunk in enumerate(tokens):
        ids[i, width_t - len(chunk) :] = torch.tensor(chunk, dtype=torch.long)
        token_mask[i, width_t - len(chunk) :] = True
    starts_t = torch.tensor(starts, dtype=torch.long).unsqueeze(1)
    offsets = (token_mask.long().cumsum(1) - 1).clamp_min(0)
    position_ids = starts_t + offsets
    write_positions = torch.where(token_mask, position_ids, torch.full_like(position_ids, scratch))
    width = max(s + len(t) for s, t in zip(starts, tokens))
    columns = torch.arange(width)
    attention = (columns[None, None, :] <= position_ids[:, :, None]).unsqueeze(1)
    return PrefillChunk(
        ids=ids.to(device), position_ids=position_ids.to(device), write_positions=write_positions.to(device),
        token_mask=token_mask.to(device), attention=attention.to(device),
        slots=torch.tensor(slots, dtype=torch.long, device=device), width=width,
    )
