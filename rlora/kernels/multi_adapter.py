"""Serving's multi-adapter delta as two Triton kernels, in the style of punica's SGMV/BGMV and
vLLM's LoRA ops: each row of the batch reads its own adapter slot of the layer's tables
(`rlora.serve.multi_linear.LayerTable`), whatever the mix of adapters, in one launch each.

With ``z = x reads_s^T`` for row ``b`` on slot ``s`` (``reads`` (S, K, d_in), K = R + NH + R0 + NH0):

    shrink   z[t] = reads[s_b] x[t]                                  (T, K) float32
    expand   out[t] += [w_1 h; ..; w_NH h; w0_1 h0; ..; w0_NH0 h0] writes[s_b]
             h = z[:R], w = softmax(z[R:R+NH] + bias[s_b]),
             h0 = z[R+NH:R+NH+R0], w0 = softmax(z[R+NH+R0:] + bias0[s_b])

The router softmax is computed inside expand, and the sum is added into the base output in
place. A row whose slot is -1 (no adapter) is skipped by both. Row ``b``'s tokens are
``[b L, (b+1) L)`` (L tokens a row: 1 in a decode step, the chunk in a prefill); with 16 or more a
program multiplies a block of them by its slot's weights on the tensor cores (``tl.dot``), with
fewer (decode) it reduces row by row. Nothing gathers whole weight tables, and the weights read
grow with the adapters in the batch, not with the rows (rows on one slot read it from cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(max(n, 1)))


@triton.jit
def _accumulate(a, b, acc, USE_DOT: tl.constexpr):
    """``acc + a @ b``: on the tensor cores for a block of 16 rows or more, else a reduction."""
    if USE_DOT:
        if a.dtype == tl.float32:
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _shrink_kernel(
    x_ptr, reads_ptr, slots_ptr, z_ptr, row_tokens, d_in, x_stride, reads_slot_stride, reads_row_stride, z_stride,
    K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        offset = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t = row * row_tokens + offset
        t_ok = offset < row_tokens
        k = tl.arange(0, KP)
        acc = tl.zeros([BLOCK_T, KP], tl.float32)
        weights = reads_ptr + slot.to(tl.int64) * reads_slot_stride
        for start in range(0, d_in, BLOCK_D):
            d = start + tl.arange(0, BLOCK_D)
            xs = tl.load(x_ptr + t[:, None] * x_stride + d[None, :], mask=t_ok[:, None] & (d[None, :] < d_in), other=0.0)
            w = tl.load(weights + k[None, :] * reads_row_stride + d[:, None], mask=(k[None, :] < K) & (d[:, None] < d_in), other=0.0)
            acc = _accumulate(xs, w, acc, USE_DOT)
        tl.store(z_ptr + t[:, None] * z_stride + k[None, :], acc, mask=t_ok[:, None] & (k[None, :] < K))


@triton.jit
def _softmax_stats(z_ptr, t, z_stride, bias_ptr, column0, heads, HP: tl.constexpr):
    """Max and denominator of each token's softmax over ``heads`` logits at ``column0`` plus bias."""
    i = tl.arange(0, HP)[None, :]
    logits = tl.load(z_ptr + t[:, None] * z_stride + column0 + i, mask=i < heads, other=0.0) + tl.load(bias_ptr + i, mask=i < heads, other=float("-inf"))
    top = tl.max(logits, axis=1)
    return top, tl.sum(tl.exp(logits - top[:, None]), axis=1)


@triton.jit
def _expand_kernel(
    out_ptr, z_ptr, writes_ptr, bias_ptr, bias0_ptr, slots_ptr, row_tokens, d_out, out_stride, z_stride,
    writes_slot_stride, writes_row_stride, bias_stride, bias0_stride,
    R: tl.constexpr, NH: tl.constexpr, R0: tl.constexpr, NH0: tl.constexpr,
    NHP: tl.constexpr, NH0P: tl.constexpr, WP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        offset = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t = row * row_tokens + offset
        t_ok = offset < row_tokens
        tz = tl.where(t_ok, t, 0)  # masked tokens read token 0's z: finite, and never stored
        slot64 = slot.to(tl.int64)
        # The stacked heads: column c = i R + j is w_i h_j; past NH R, the correction's w0_i h0_j.
        c = tl.arange(0, WP)[None, :]
        is_head = c < NH * R
        head, entry = c // R, c % R
        top, total = _softmax_stats(z_ptr, tz, z_stride, bias_ptr + slot64 * bias_stride, R, NH, NHP)
        logit = (tl.load(z_ptr + tz[:, None] * z_stride + R + head, mask=is_head, other=0.0)
                 + tl.load(bias_ptr + slot64 * bias_stride + head, mask=is_head, other=0.0))
        h = tl.load(z_ptr + tz[:, None] * z_stride + entry, mask=is_head, other=0.0)
        stacked = tl.where(is_head, tl.exp(logit - top[:, None]) / total[:, None] * h, 0.0)
        if R0 > 0:
            is_correction = (c >= NH * R) & (c < NH * R + NH0 * R0)
            head0, entry0 = (c - NH * R) // R0, (c - NH * R) % R0
            top0, total0 = _softmax_stats(z_ptr, tz, z_stride, bias0_ptr + slot64 * bias0_stride, R + NH + R0, NH0, NH0P)
            logit0 = (tl.load(z_ptr + tz[:, None] * z_stride + R + NH + R0 + head0, mask=is_correction, other=0.0)
                      + tl.load(bias0_ptr + slot64 * bias0_stride + head0, mask=is_correction, other=0.0))
            h0 = tl.load(z_ptr + tz[:, None] * z_stride + R + NH + entry0, mask=is_correction, other=0.0)
            stacked += tl.where(is_correction, tl.exp(logit0 - top0[:, None]) / total0[:, None] * h0, 0.0)

        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        cw = tl.arange(0, WP)[:, None]
        writes = tl.load(writes_ptr + slot64 * writes_slot_stride + cw * writes_row_stride + n[None, :],
                         mask=(cw < NH * R + NH0 * R0) & (n[None, :] < d_out), other=0.0)
        delta = _accumulate(stacked.to(writes.dtype), writes, tl.zeros([BLOCK_T, BLOCK_N], tl.float32), USE_DOT)
        where = out_ptr + t[:, None] * out_stride + n[None, :]
        ok = t_ok[:, None] & (n[None, :] < d_out)
        base = tl.load(where, mask=ok, other=0.0)
        tl.store(where, (base.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=ok)


def _token_block(row_tokens: int) -> tuple[int, bool]:
    """Tokens of one row per program, and whether they go through ``tl.dot`` (16 rows or more)."""
    return (32, True) if row_tokens >= 16 else (_pow2(row_tokens), False)


@triton_op("rlora::multi_adapter_shrink", mutates_args={})
def _shrink_op(x: torch.Tensor, reads: torch.Tensor, row_slots: torch.Tensor, row_tokens: int) -> torch.Tensor:
    tokens, d_in = x.shape
    k = reads.shape[1]
    z = torch.empty(tokens, k, dtype=torch.float32, device=x.device)
    block_t, use_dot = _token_block(row_tokens)
    block_d = 64 if use_dot else 128
    grid = (row_slots.shape[0], triton.cdiv(row_tokens, block_t))
    wrap_triton(_shrink_kernel)[grid](
        x, reads, row_slots, z, row_tokens, d_in, x.stride(0), reads.stride(0), reads.stride(1), z.stride(0),
        K=k, KP=_pow2(k, 16), BLOCK_T=block_t, BLOCK_D=block_d, USE_DOT=use_dot,
    )
    return z


@triton_op("rlora::multi_adapter_expand", mutates_args={"out"})
def _expand_op(out: torch.Tensor, z: torch.Tensor, writes: torch.Tensor, bias: torch.Tensor, bias0: torch.Tensor,
               row_slots: torch.Tensor, row_tokens: int, rank: int, heads: int, correction_rank: int,
               correction_heads: int) -> None:
    d_out = out.shape[1]
    block_t, use_dot = _token_block(row_tokens)
    block_n = 64 if use_dot else 128
    grid = (row_slots.shape[0], triton.cdiv(row_tokens, block_t), triton.cdiv(d_out, block_n))
    wrap_triton(_expand_kernel)[grid](
        out, z, writes, bias, bias0, row_slots, row_tokens, d_out, out.stride(0), z.stride(0),
        writes.stride(0), writes.stride(1), bias.stride(0), bias0.stride(0),
        R=rank, NH=heads, R0=correction_rank, NH0=correction_heads, NHP=_pow2(heads), NH0P=_pow2(correction_heads),
        WP=_pow2(writes.shape[1], 16), BLOCK_T=block_t, BLOCK_N=block_n, USE_DOT=use_dot,
    )


def shrink(x: torch.Tensor, reads: torch.Tensor, row_slots: torch.Tensor, row_tokens: int) -> torch.Tensor:
    """``z`` (T, K) in float32: each token against its row's slot of ``reads`` (S, K, d_in). ``x``
    is (T, d_in) with T = rows x ``row_tokens``; ``row_slots`` (rows,) int64, -1 for no adapter
    (that row's z is left unwritten)."""
    return _shrink_op(x, reads, row_slots, row_tokens)


def expand_(out: torch.Tensor, z: torch.Tensor, writes: torch.Tensor, bias: torch.Tensor, bias0: torch.Tensor,
            row_slots: torch.Tensor, row_tokens: int, rank: int, heads: int, correction_rank: int, correction_heads: int) -> None:
    """``out`` (T, d_out) += each token's weighed heads times its slot's ``writes`` (S, W, d_out),
    in place; the router softmax from ``z`` and the slot's ``bias`` (S, NH) / ``bias0`` (S, NH0)."""
    _expand_op(out, z, writes, bias, bias0, row_slots, row_tokens, rank, heads, correction_rank, correction_heads)
