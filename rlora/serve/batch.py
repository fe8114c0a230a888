"""The running batch of one base model: its rows, their KV cache, attention mask, positions and
next input tokens, kept aligned as rows join (merged in, left-padded to a common length) and
leave (selected out, all-padding columns trimmed); and the masks of a left-padded prefill.

Merging and trimming assume full-attention cache layers that keep every position (checked by
`BaseModelRunner` when it loads a model).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache


def prefill_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool for a left-padded prefill with token mask ``mask`` (B, T) bool: causal
    over real tokens; a padding query sees itself only, so no attention row is empty (an empty
    row gives NaN in some SDPA kernels)."""
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    full = causal.unsqueeze(0) & mask.unsqueeze(1)
    full |= torch.eye(width, dtype=torch.bool, device=mask.device).unsqueeze(0)
    return full.unsqueeze(1)


def prefill_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts from 0 at its first real token."""
    return (mask.long().cumsum(1) - 1).clamp_min(0)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, 1, Q, K) bool mask (True: may attend) as the additive float mask that eager and
    SDPA attention take as it is, in every transformers version."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _left_pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` zero-padded on the left to ``width``: along dim 1 for a mask (B, L), along dim -2
    (the positions) for a cache tensor."""
    length = t.shape[1] if t.dim() == 2 else t.shape[-2]
    if length == width:
        return t
    if t.dim() == 2:
        return torch.cat([torch.zeros(t.shape[0], width - length, dtype=t.dtype, device=t.device), t], dim=1)
    shape = list(t.shape)
    shape[-2] = width - length
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=-2)


class RunningBatch:
    """Rows being decoded together. ``rows[i]`` owns row ``i`` of every tensor."""

    def __init__(self, model_config, device: torch.device):
        self._config = model_config
        self._device = device
        self.max_rows = 0  # largest batch seen, for tests and stats
        self.clear()

    def clear(self) -> None:
        self.rows: list = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) bool: real tokens in the cache (and the next one)
        self.positions: torch.Tensor | None = None  # (B,) next position id
        self.next: torch.Tensor | None = None  # (B,) next input token

    def __len__(self) -> int:
        return len(self.rows)

    def merge(self, rows: Sequence, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Add prefilled ``rows`` with their cache, token mask (B', L'), next positions and
        tokens; the shorter side is left-padded to the longer."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.next = list(rows), cache, mask, positions, next_tokens
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            layers = [
                (torch.cat([_left_pad_to(k_old, width), _left_pad_to(k_new, width)]), torch.cat([_left_pad_to(v_old, width), _left_pad_to(v_new, width)]))
                for (k_old, v_old, *_), (k_new, v_new, *_) in zip(self.cache, cache)
            ]
            self.cache = DynamicCache(layers, config=self._config)
            self.mask = torch.cat([_left_pad_to(self.mask, width), _left_pad_to(mask, width)])
            self.positions = torch.cat([self.positions, positions])
            self.next = torch.cat([self.next, next_tokens])
            self.rows = self.rows + list(rows)
        self.max_rows = max(self.max_rows, len(self.rows))

    def keep(self, rows: list) -> None:
        """Shrink the batch to ``rows`` (a subsequence of the current rows)."""
        if not rows:
            self.clear()
            return
        position = {id(r): i for i, r in enumerate(self.rows)}
        index = torch.tensor([position[id(r)] for r in rows], device=self._device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]  # drop all-padding columns on the left
        layers = [(k.index_select(0, index)[..., start:, :], v.index_select(0, index)[..., start:, :]) for k, v, *_ in self.cache]
        self.cache = DynamicCache(layers, config=self._config)
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.next = self.next.index_select(0, index)
        self.rows = rows

    def advance(self, mask: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """After a decode step that fed ``next`` with token mask ``mask`` (B, L + 1): those tokens
        are in the cache now, ``next_tokens`` come next."""
        self.mask = mask
        self.positions = self.positions + 1
        self.next = next_tokens
