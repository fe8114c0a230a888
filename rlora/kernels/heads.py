"""The fused adapter's per-token work as one Triton kernel forward and one backward.

Between its two matmuls (``z = x [A; W_r; A0; W_r0]^T`` and ``y = base + delta_in writes^T``,
see `rlora.adapter.fused`) the adapter does, per token, with ``q`` the keep probability:

    h, logits, h0, logits0 = split(z)       [R | N router rows | R0 | N0 router rows]
    w  = softmax(logits)                     1 for the single head of a layer without a router
    w0 = softmax(logits0)                    1 for the correction's one mean head
    delta_in = [w_i * keep_i / q * h  for each head i | w0_i * h0  for each correction head i]

and backward from ``grad_delta = g writes``: ``dh``, ``dlogits`` (the softmax backward) and,
for the input's gradient, ``dh0`` and ``dlogits0``; plus the stacked heads ``H`` that grad B
needs. In PyTorch that is a dozen small kernels and a bool mask per head kept for backward;
here it is one launch each way, and the mask of head ``i``, rank entry ``j`` of token ``t`` is
``rand(seed, (t N + i) R + j) < q`` (Triton's Philox), drawn again in backward from the seed.
Everything is computed in float32 whatever the input dtype, as the PyTorch path does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@dataclass(frozen=True)
class HeadLayout:
    """The columns of ``z`` and of ``delta_in`` for one adapted layer."""

    rank: int
    heads: int
    routed: bool  # a router: N logits follow h in z (else N == 1, weight 1)
    correction_rank: int  # 0 without the frozen init correction
    correction_heads: int  # N (routed), 1 (the mean initial head) or 0
    correction_routed: bool

    @property
    def reads(self) -> int:  # columns of z
        return (self.rank + (self.heads if self.routed else 0) + self.correction_rank
                + (self.correction_heads if self.correction_routed else 0))

    @property
    def writes(self) -> int:  # columns of delta_in
        return self.heads * self.rank + self.correction_heads * self.correction_rank


def _pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(n))


def _block_tokens(layout: HeadLayout) -> int:
    """Tokens per program: a few thousand values of the (tokens, heads, rank) block each."""
    per_token = _pow2(layout.heads) * _pow2(layout.rank) + _pow2(max(layout.correction_heads, 1)) * _pow2(max(layout.correction_rank, 1))
    return max(1, min(64, _pow2(4096 // per_token) // 2))


@triton.jit
def _keep(seed, t, i, j, N: tl.constexpr, R: tl.constexpr, keep_prob):
    """The multi-head dropout's keep mask of (token t, head i, rank entry j), broadcast."""
    return tl.rand(seed, ((t * N + i) * R + j).to(tl.int32)) < keep_prob


@triton.jit
def _softmax_rows(logits):
    top = tl.max(logits, axis=1)
    e = tl.exp(logits - top[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _load_rows(ptr, t, stride, column0, cols, mask):
    return tl.load(ptr + t * stride + column0 + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _heads_forward_kernel(
    z_ptr, seed_ptr, delta_ptr, weights_ptr, tokens, z_stride, delta_stride, keep_prob,
    R: tl.constexpr, N: tl.constexpr, R0: tl.constexpr, N0: tl.constexpr, K0: tl.constexpr,
    ROUTED: tl.constexpr, ROUTED0: tl.constexpr, DROPOUT: tl.constexpr,
    RP: tl.constexpr, NP: tl.constexpr, R0P: tl.constexpr, N0P: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < tokens
    t2 = t[:, None]
    j = tl.arange(0, RP)[None, :]
    i = tl.arange(0, NP)[None, :]
    h = _load_rows(z_ptr, t2, z_stride, 0, j, t_ok[:, None] & (j < R))
    if ROUTED:
        logits = _load_rows(z_ptr, t2, z_stride, R, i, t_ok[:, None] & (i < N))
        w = _softmax_rows(tl.where(i < N, logits, float("-inf")))
        tl.store(weights_ptr + t2 * N + i, w, mask=t_ok[:, None] & (i < N))
    else:
        w = tl.where(i < N, 1.0, 0.0) + tl.zeros([BLOCK_T, NP], tl.float32)
    heads = h[:, None, :] * w[:, :, None]  # (BLOCK_T, NP, RP)
    t3, i3, j3 = t[:, None, None], tl.arange(0, NP)[None, :, None], tl.arange(0, RP)[None, None, :]
    if DROPOUT:
        keep = _keep(tl.load(seed_ptr), t3, i3, j3, N, R, keep_prob)
        heads = tl.where(keep, heads / keep_prob, 0.0)
    ok3 = (t3 < tokens) & (i3 < N) & (j3 < R)
    tl.store(delta_ptr + t3 * delta_stride + i3 * R + j3, heads.to(delta_ptr.dtype.element_ty), mask=ok3)

    if R0 > 0:
        j0 = tl.arange(0, R0P)[None, :]
        i0 = tl.arange(0, N0P)[None, :]
        h0 = _load_rows(z_ptr, t2, z_stride, K0, j0, t_ok[:, None] & (j0 < R0))
        if ROUTED0:
            w0 = _softmax_rows(tl.where(i0 < N0, _load_rows(z_ptr, t2, z_stride, K0 + R0, i0, t_ok[:, None] & (i0 < N0)), float("-inf")))
        else:
            w0 = tl.where(i0 < N0, 1.0, 0.0) + tl.zeros([BLOCK_T, N0P], tl.float32)
        correction = h0[:, None, :] * w0[:, :, None]
        i03, j03 = tl.arange(0, N0P)[None, :, None], tl.arange(0, R0P)[None, None, :]
        ok03 = (t3 < tokens) & (i03 < N0) & (j03 < R0)
        tl.store(delta_ptr + t3 * delta_stride + N * R + i03 * R0 + j03, correction.to(delta_ptr.dtype.element_ty), mask=ok03)


@triton.jit
def _heads_backward_kernel(
    grad_ptr, z_ptr, seed_ptr, dz_ptr, stacked_ptr, tokens, grad_stride, z_stride, dz_stride, stacked_stride, keep_prob,
    R: tl.constexpr, N: tl.constexpr, R0: tl.constexpr, N0: tl.constexpr, K0: tl.constexpr,
    ROUTED: tl.constexpr, ROUTED0: tl.constexpr, DROPOUT: tl.constexpr, CORRECTION_GRAD: tl.constexpr,
    RP: tl.constexpr, NP: tl.constexpr, R0P: tl.constexpr, N0P: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < tokens
    t2 = t[:, None]
    j = tl.arange(0, RP)[None, :]
    i = tl.arange(0, NP)[None, :]
    t3, i3, j3 = t[:, None, None], tl.arange(0, NP)[None, :, None], tl.arange(0, RP)[None, None, :]
    ok3 = (t3 < tokens) & (i3 < N) & (j3 < R)

    h = _load_rows(z_ptr, t2, z_stride, 0, j, t_ok[:, None] & (j < R))
    if ROUTED:
        w = _softmax_rows(tl.where(i < N, _load_rows(z_ptr, t2, z_stride, R, i, t_ok[:, None] & (i < N)), float("-inf")))
    else:
        w = tl.where(i < N, 1.0, 0.0) + tl.zeros([BLOCK_T, NP], tl.float32)
    masked = h[:, None, :] + tl.zeros([BLOCK_T, NP, RP], tl.float32)  # M_i * h
    if DROPOUT:
        keep = _keep(tl.load(seed_ptr), t3, i3, j3, N, R, keep_prob)
        masked = tl.where(keep, masked / keep_prob, 0.0)
    stacked = masked * w[:, :, None]
    tl.store(stacked_ptr + t3 * stacked_stride + i3 * R + j3, stacked.to(stacked_ptr.dtype.element_ty), mask=ok3)

    grads = tl.load(grad_ptr + t3 * grad_stride + i3 * R + j3, mask=ok3, other=0.0).to(tl.float32)  # G_i
    weighted = grads * w[:, :, None]
    if DROPOUT:
        weighted = tl.where(keep, weighted / keep_prob, 0.0)
    d_h = tl.sum(weighted, axis=1)
    tl.store(dz_ptr + t2 * dz_stride + j, d_h.to(dz_ptr.dtype.element_ty), mask=t_ok[:, None] & (j < R))
    if ROUTED:
        d_w = tl.sum(grads * masked, axis=2)
        d_logits = w * (d_w - tl.sum(w * d_w, axis=1)[:, None])
        tl.store(dz_ptr + t2 * dz_stride + R + i, d_logits.to(dz_ptr.dtype.element_ty), mask=t_ok[:, None] & (i < N))

    if CORRECTION_GRAD:  # the frozen correction: its part of the input's gradient
        j0 = tl.arange(0, R0P)[None, :]
        i0 = tl.arange(0, N0P)[None, :]
        i03, j03 = tl.arange(0, N0P)[None, :, None], tl.arange(0, R0P)[None, None, :]
        ok03 = (t3 < tokens) & (i03 < N0) & (j03 < R0)
        grads0 = tl.load(grad_ptr + t3 * grad_stride + N * R + i03 * R0 + j03, mask=ok03, other=0.0).to(tl.float32)
        if ROUTED0:
            h0 = _load_rows(z_ptr, t2, z_stride, K0, j0, t_ok[:, None] & (j0 < R0))
            w0 = _softmax_rows(tl.where(i0 < N0, _load_rows(z_ptr, t2, z_stride, K0 + R0, i0, t_ok[:, None] & (i0 < N0)), float("-inf")))
            d_w0 = tl.sum(grads0 * h0[:, None, :], axis=2)
            d_logits0 = w0 * (d_w0 - tl.sum(w0 * d_w0, axis=1)[:, None])
            tl.store(dz_ptr + t2 * dz_stride + K0 + R0 + i0, d_logits0.to(dz_ptr.dtype.element_ty), mask=t_ok[:, None] & (i0 < N0))
            grads0 = grads0 * w0[:, :, None]
        d_h0 = tl.sum(grads0, axis=1)
        tl.store(dz_ptr + t2 * dz_stride + K0 + j0, d_h0.to(dz_ptr.dtype.element_ty), mask=t_ok[:, None] & (j0 < R0))


def _layout_args(layout: HeadLayout) -> dict:
    return dict(
        R=layout.rank, N=layout.heads, R0=layout.correction_rank, N0=layout.correction_heads,
        K0=layout.rank + (layout.heads if layout.routed else 0),  # where h0 starts in z
        ROUTED=layout.routed, ROUTED0=layout.correction_routed,
        RP=_pow2(layout.rank), NP=_pow2(layout.heads), R0P=_pow2(max(layout.correction_rank, 1)),
        N0P=_pow2(max(layout.correction_heads, 1)), BLOCK_T=_block_tokens(layout),
    )


def _layout(rank, heads, routed, correction_rank, correction_heads, correction_routed) -> HeadLayout:
    return HeadLayout(rank, heads, routed, correction_rank, correction_heads, correction_routed)


@triton_op("rlora::heads_forward", mutates_args={})
def _heads_forward_op(z: torch.Tensor, seed: torch.Tensor, rank: int, heads: int, routed: bool, correction_rank: int,
                      correction_heads: int, correction_routed: bool, keep_prob: float, dropout: bool,
                      out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _layout(rank, heads, routed, correction_rank, correction_heads, correction_routed)
    tokens = z.shape[0]
    delta = torch.empty(tokens, layout.writes, dtype=out_dtype, device=z.device)
    weights = torch.empty(tokens, heads if routed else 0, dtype=torch.float32, device=z.device)
    args = _layout_args(layout)
    grid = (triton.cdiv(tokens, args["BLOCK_T"]),)
    wrap_triton(_heads_forward_kernel)[grid](
        z, seed, delta, weights if routed else delta, tokens, z.stride(0), delta.stride(0), keep_prob, DROPOUT=dropout, **args,
    )
    return delta, weights


@triton_op("rlora::heads_backward", mutates_args={})
def _heads_backward_op(grad_delta: torch.Tensor, z: torch.Tensor, seed: torch.Tensor, rank: int, heads: int, routed: bool,
                       correction_rank: int, correction_heads: int, correction_routed: bool, keep_prob: float, dropout: bool,
                       correction_grad: bool, dz_dtype: torch.dtype, stacked_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _layout(rank, heads, routed, correction_rank, correction_heads, correction_routed)
    tokens = z.shape[0]
    d_z = torch.empty(tokens, layout.reads, dtype=dz_dtype, device=z.device)
    stacked = torch.empty(tokens, heads * rank, dtype=stacked_dtype, device=z.device)
    args = _layout_args(layout)
    grid = (triton.cdiv(tokens, args["BLOCK_T"]),)
    wrap_triton(_heads_backward_kernel)[grid](
        grad_delta, z, seed, d_z, stacked, tokens, grad_delta.stride(0), z.stride(0), d_z.stride(0), stacked.stride(0),
        keep_prob, DROPOUT=dropout, CORRECTION_GRAD=correction_grad and correction_rank > 0, **args,
    )
    return d_z, stacked


def heads_forward(z: torch.Tensor, seed: torch.Tensor | None, layout: HeadLayout, keep_prob: float,
                  out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``delta_in`` (T, layout.writes) in ``out_dtype`` and the router weights (T, N) in float32
    (None without a router) from ``z`` (T, layout.reads); ``seed`` (a one-element int64 tensor)
    draws the multi-head dropout, None for none."""
    delta, weights = _heads_forward_op(
        z, z if seed is None else seed, layout.rank, layout.heads, layout.routed, layout.correction_rank,
        layout.correction_heads, layout.correction_routed, keep_prob, seed is not None, out_dtype,
    )
    return delta, weights if layout.routed else None


def heads_backward(grad_delta: torch.Tensor, z: torch.Tensor, seed: torch.Tensor | None, layout: HeadLayout, keep_prob: float,
                   correction_grad: bool, dz_dtype: torch.dtype, stacked_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``d_z`` (T, layout.reads) in ``dz_dtype`` (the correction's columns written only with
    ``correction_grad``) and the stacked heads ``H`` (T, N*R) in ``stacked_dtype``, with the
    masks drawn again from ``seed``."""
    return _heads_backward_op(
        grad_delta, z, z if seed is None else seed, layout.rank, layout.heads, layout.routed, layout.correction_rank,
        layout.correction_heads, layout.correction_routed, keep_prob, seed is not None, correction_grad, dz_dtype, stacked_dtype,
    )


@triton.jit
def _keep_mask_kernel(seed_ptr, keep_ptr, total, keep_prob, N: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # (t, i, j) flattened is the offset itself: _keep's formula with t N R + i R + j.
    keep = tl.rand(tl.load(seed_ptr), offsets.to(tl.int32)) < keep_prob
    tl.store(keep_ptr + offsets, keep.to(tl.int8), mask=offsets < total)


def head_keep_mask(seed: torch.Tensor, tokens: int, heads: int, rank: int, keep_prob: float) -> torch.Tensor:
    """The bool keep masks (tokens, heads, rank) the kernels draw from ``seed``: for checking them
    against the PyTorch path, which takes masks as tensors."""
    total = tokens * heads * rank
    keep = torch.empty(total, dtype=torch.int8, device=seed.device)
    block = 1024
    _keep_mask_kernel[(triton.cdiv(total, block),)](seed, keep, total, keep_prob, N=heads, R=rank, BLOCK=block)
    return keep.view(tokens, heads, rank).bool()
