"""The adapter delta of `RLoRALinear` as one autograd function: two matmuls forward, a few back.

Per token, with ``s`` the scaling, ``q = 1 - p`` the keep probability, ``K_i`` (bool, per
head) the multi-head dropout masks, ``M_i = K_i / q``, and ``x_d`` the input after input dropout
(the caller's `torch.native_dropout`, whose mask and backward are autograd's own fused kernels):

    z    = [A; W_r; A0; W_r0] x  (A reads x_d instead when there is input dropout)
    h, logits, h0, logits0 = split(z)
    w    = softmax(logits)                      float32; w = 1 when there is no router
    w0   = softmax(logits0)                     float32; w0 = 1 (one correction head: the mean
                                                initial head) when there is no W_r0
    H_i  = w_i * (M_i * h)                       (N, r) per token, never saved
    H0_i = w0_i * h0                             the correction's heads, no dropout
    y    = base + [s B_1 .. s B_N | -s B0_1 .. -s B0_N0] [H; H0]

Backward, from the output gradient ``g`` (T, d_out), saving only ``h`` (T, r), ``w`` (T, N),
``h0`` and ``w0`` (for a routed correction), the bool masks, the layer input ``x`` (which
computing grad A needs anyway), with input dropout ``x_d`` (once, whatever the heads), and the weights as packed and cast for the forward
(weight-sized, so backward casts nothing again):

    [G_1 .. G_N | G0] = g [s B_1 .. s B_N | -s B0]           one matmul
    grad B_i  = s g^T H_i                                     one matmul, H rebuilt from h, M, w
    dw_i      = <G_i, M_i * h>                                per token
    dlogits   = w * (dw - sum_j w_j dw_j)                     softmax backward
    dh        = sum_i w_i M_i * G_i
    dh0, dlogits0 likewise from G0, h0 and w0 (only for grad x: nothing of it is trained)
    grad [A; W_r] = [dh | dlogits]^T x                        one matmul (two with input dropout:
                                                              grad A = dh^T x_d)
    grad x    = [dh | dlogits | dh0 | dlogits0] [A; W_r; A0; W_r0]
                                                              one matmul (with input dropout,
                                                              grad x_d = dh A apart: autograd's
                                                              dropout backward takes it to x)

A0, W_r0 and B0 are frozen: no gradient. The base layer keeps its own autograd.

With ``use_kernels`` (`rlora.kernels`: Triton on CUDA) the per-token work between the matmuls,
forward and backward, is one kernel each way (`rlora.kernels.heads`): z is saved instead of h,
w, h0 and w0, and the multi-head dropout masks are drawn from a seed, again in backward, instead
of being kept. The matmuls are the same.
"""

from __future__ import annotations

import torch


def pack_reads(lora_A, router, lora_A0, router0, dtype: torch.dtype) -> torch.Tensor:
    """``[A; W_r; A0; W_r0]`` (the rows that read x) in ``dtype``. The concatenation is the
    cast's own copy (one kernel): a cast per part would cost more kernels, and a matmul per
    part would read x once per part."""
    parts = [t for t in (lora_A, router, lora_A0, router0) if t is not None]
    packed = torch.empty(sum(t.shape[0] for t in parts), lora_A.shape[1], dtype=dtype, device=lora_A.device)
    return torch.cat(parts, out=packed)


def correction_heads(lora_B0) -> int:
    """How many initial heads the correction has: N (routed, ``(N, d_out, r)``), 1 (the mean
    initial head, ``(d_out, r)``) or 0 (none)."""
    if lora_B0 is None:
        return 0
    return lora_B0.shape[0] if lora_B0.dim() == 3 else 1


def pack_writes(lora_B, lora_B0, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``s [B_1 .. B_N | -B0_1 .. -B0_N0]`` (the columns that write the output) in ``dtype``,
    scaled and cast in one pass per part. Training, eval and serving all pack with it, so they
    round alike."""
    heads, d_out, rank = lora_B.shape
    n0 = correction_heads(lora_B0)
    correction_columns = 0 if lora_B0 is None else n0 * lora_B0.shape[-1]
    writes = torch.empty(d_out, heads * rank + correction_columns, dtype=dtype, device=lora_B.device)
    torch.mul(lora_B.permute(1, 0, 2), scaling, out=writes[:, : heads * rank].view(d_out, heads, rank))
    if lora_B0 is not None:
        initial = lora_B0 if lora_B0.dim() == 3 else lora_B0.unsqueeze(0)
        torch.mul(initial.permute(1, 0, 2), -scaling, out=writes[:, heads * rank :].view(d_out, n0, -1))
    return writes


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 or wider: the per-token rank-r arithmetic (masks, softmax and its
    backward) is cheap, and bfloat16 would round 1/(1-p) (1/0.9 to 1.109), systematically
    shrinking the adapter in training against eval."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _dropped(t: torch.Tensor, keep: torch.Tensor | None, keep_scale: float) -> torch.Tensor:
    """Inverted dropout of the rank-r ``t`` with a given bool mask (broadcast); ``t`` itself
    without one."""
    return t if keep is None else t.mul(keep).mul_(keep_scale)


class FusedAdapter(torch.autograd.Function):
    """``base + delta`` for one adapted layer; see the module docstring for the formulas.

    Returns the output and the router weights (T, N) in float32 (None without a router), the
    latter for the routing observer and not differentiable.
    """

    @staticmethod
    def forward(ctx, x, x_dropped, base_out, lora_A, lora_B, router, lora_A0, router0, lora_B0, head_keep,
                keep_prob: float, scaling: float, compute_dtype: torch.dtype, dropout_seed=None, use_kernels: bool = False):
        d_in, d_out = x.shape[-1], base_out.shape[-1]
        heads, rank = lora_B.shape[0], lora_B.shape[2]
        keep_scale = 1.0 / keep_prob
        x2 = x.reshape(-1, d_in).to(compute_dtype)
        dropped2 = None if x_dropped is None else x_dropped.reshape(-1, d_in).to(compute_dtype)
        head_keep2 = None if head_keep is None else head_keep.reshape(-1, heads, rank)
        reads = pack_reads(lora_A, router, lora_A0, router0, compute_dtype)
        writes = pack_writes(lora_B, lora_B0, scaling, base_out.dtype)
        ctx.keep_prob, ctx.scaling, ctx.heads, ctx.rank = keep_prob, scaling, heads, rank
        ctx.param_dtype = lora_A.dtype
        ctx.use_kernels = use_kernels

        if use_kernels:  # the per-token work in one Triton kernel; masks from dropout_seed
            from ..kernels.heads import heads_forward

            ctx.layout = head_layout(lora_B, router, lora_A0, router0, lora_B0)
            z = x2 @ reads.T
            delta_in, weights = heads_forward(z, dropout_seed, ctx.layout, keep_prob, base_out.dtype)
            out = torch.addmm(base_out.reshape(-1, d_out), delta_in, writes.T)
            ctx.save_for_backward(x, z, dropout_seed, reads, writes)
            if weights is not None:
                ctx.mark_non_differentiable(weights)
            return out.view(base_out.shape), weights

        # Everything that reads x in one matmul; with input dropout A reads x_d in its own.
        if dropped2 is None:
            z = x2 @ reads.T
            # h is saved: its own storage, or the router's and correction's columns would be too.
            h, rest = z[:, :rank].contiguous(), z[:, rank:]
        else:
            h = dropped2 @ reads[:rank].T
            rest = x2 @ reads[rank:].T if reads.shape[0] > rank else None

        stacked = _dropped(_wide(h).unsqueeze(1).expand(-1, heads, -1), head_keep2, keep_scale)  # M_i * h
        weights = None
        router_rows = 0 if router is None else heads
        if router is not None:
            weights = torch.softmax(_wide(rest[:, :heads]), dim=-1)
            stacked = stacked * weights.unsqueeze(-1)
        # [H; H0] written in place in the output matmul's dtype: one cast, no concatenation.
        delta_in = torch.empty(x2.shape[0], writes.shape[1], dtype=base_out.dtype, device=x.device)
        delta_in[:, : heads * rank] = stacked.flatten(1)
        h0 = weights0 = None
        if lora_A0 is not None:
            h0 = rest[:, router_rows : router_rows + lora_A0.shape[0]]
            if router0 is None:
                delta_in[:, heads * rank :] = h0
                h0 = None  # backward needs it only to weigh a routed correction
            else:
                h0 = _wide(h0).contiguous()  # saved: its own storage, as h
                weights0 = torch.softmax(_wide(rest[:, router_rows + lora_A0.shape[0] :]), dim=-1)
                delta_in[:, heads * rank :] = (weights0.unsqueeze(-1) * h0.unsqueeze(1)).flatten(1)
        # addmm adds into the base output in the same BLAS call: no full-width temporary.
        out = torch.addmm(base_out.reshape(-1, d_out), delta_in, writes.T)

        # The dropped input is saved once (in the compute dtype), whatever the number of heads:
        # grad A needs it, and recomputing it in backward cost more on an H200 than keeping it.
        ctx.save_for_backward(x, dropped2, h, weights, h0, weights0, head_keep2, reads, writes)
        ctx.dropped_dtype = None if x_dropped is None else x_dropped.dtype
        if weights is not None:
            ctx.mark_non_differentiable(weights)
        return out.view(base_out.shape), weights

    @staticmethod
    def backward(ctx, grad_out, _grad_weights):
        if ctx.use_kernels:
            return _kernel_backward(ctx, grad_out)
        x, dropped2, h, weights, h0, weights0, head_keep2, reads, writes = ctx.saved_tensors
        heads, rank, keep_scale, param_dtype = ctx.heads, ctx.rank, 1.0 / ctx.keep_prob, ctx.param_dtype
        needs_x, needs_dropped, _, needs_A, needs_B, needs_router = ctx.needs_input_grad[:6]
        routed = weights is not None
        trained_rows = rank + (heads if routed else 0)  # rows of `reads` with a gradient; A0 is frozen
        d_in, d_out = x.shape[-1], grad_out.shape[-1]
        g = grad_out.reshape(-1, d_out)

        d_delta_in = _wide(g @ writes)  # [G_1 .. G_N | G0]
        grad_heads = d_delta_in[:, : heads * rank].view(-1, heads, rank)
        masked = _dropped(_wide(h).unsqueeze(1).expand(-1, heads, -1), head_keep2, keep_scale)  # M_i * h
        stacked, weighted_grads = masked, grad_heads
        if routed:
            d_weights = (grad_heads * masked).sum(-1)
            d_logits = weights * (d_weights - (weights * d_weights).sum(-1, keepdim=True))
            stacked, weighted_grads = masked * weights.unsqueeze(-1), grad_heads * weights.unsqueeze(-1)
        d_h = _dropped(weighted_grads, head_keep2, keep_scale).sum(1)

        grad_B = None
        if needs_B:
            # H^T g rather than g^T H: the same numbers, and the layout BLAS does fast on the CPU.
            grad_writes_t = _wide(stacked.flatten(1).to(g.dtype).T @ g) * ctx.scaling  # (N*r, d_out)
            grad_B = grad_writes_t.view(heads, rank, d_out).transpose(1, 2).to(param_dtype, memory_format=torch.contiguous_format)

        # dz in the column order of `reads`: [dh | dlogits | dh0 | dlogits0].
        d_z = torch.empty(g.shape[0], reads.shape[0], dtype=reads.dtype, device=g.device)
        d_z[:, :rank] = d_h
        if routed:
            d_z[:, rank:trained_rows] = d_logits
        if needs_x and reads.shape[0] > trained_rows:  # the frozen correction: a gradient for x only
            grad_correction = d_delta_in[:, heads * rank :]
            if weights0 is None:
                d_z[:, trained_rows:] = grad_correction
            else:
                grad_correction = grad_correction.view(-1, weights0.shape[1], h0.shape[1])
                d_weights0 = (grad_correction * h0.unsqueeze(1)).sum(-1)
                d_z[:, trained_rows : trained_rows + h0.shape[1]] = (grad_correction * weights0.unsqueeze(-1)).sum(1)
                d_z[:, trained_rows + h0.shape[1] :] = weights0 * (d_weights0 - (weights0 * d_weights0).sum(-1, keepdim=True))

        grad_A = grad_router = grad_x = grad_dropped = None
        x2 = x.reshape(-1, d_in).to(reads.dtype) if needs_A or needs_router else None
        if needs_x and (dropped2 is None or reads.shape[0] > rank):
            # Written into a tensor of x's shape, not a view of one: the autograd engine adds
            # the base layer's gradient into it in place, and a view would cost a copy.
            grad_x = torch.empty(x.shape, dtype=reads.dtype, device=x.device)
        if dropped2 is None:
            if needs_A or needs_router:
                grad_trained = (d_z[:, :trained_rows].T @ x2).to(param_dtype)
                grad_A, grad_router = grad_trained[:rank], grad_trained[rank:] if routed else None
            if grad_x is not None:
                torch.mm(d_z, reads, out=grad_x.view(-1, d_in))
        else:
            if needs_A:
                grad_A = (d_z[:, :rank].T @ dropped2).to(param_dtype)
            if needs_router:
                grad_router = (d_z[:, rank:trained_rows].T @ x2).to(param_dtype)
            if needs_dropped:
                grad_dropped = (d_z[:, :rank] @ reads[:rank]).view(x.shape).to(ctx.dropped_dtype)
            if grad_x is not None:  # the router and the correction read x itself
                torch.mm(d_z[:, rank:], reads[rank:], out=grad_x.view(-1, d_in))
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_dropped, grad_out, grad_A, grad_B, grad_router, *_NO_GRADS


# The gradients of the arguments after grad_router: frozen tensors, masks and settings.
_NO_GRADS = (None,) * 9


def head_layout(lora_B, router, lora_A0, router0, lora_B0):
    """The kernels' view of a layer's columns (`rlora.kernels.heads.HeadLayout`)."""
    from ..kernels.heads import HeadLayout

    return HeadLayout(
        rank=lora_B.shape[2], heads=lora_B.shape[0], routed=router is not None,
        correction_rank=0 if lora_A0 is None else lora_A0.shape[0], correction_heads=correction_heads(lora_B0),
        correction_routed=router0 is not None,
    )


def _kernel_backward(ctx, grad_out):
    """`FusedAdapter.backward` with the per-token work in one Triton kernel (the matmuls are the
    same): the masks are drawn again from the saved seed."""
    from ..kernels.heads import heads_backward

    x, z, dropout_seed, reads, writes = ctx.saved_tensors
    needs_x, _, _, needs_A, needs_B, needs_router = ctx.needs_input_grad[:6]
    layout, rank = ctx.layout, ctx.rank
    trained_rows = rank + (layout.heads if layout.routed else 0)
    d_in, d_out = x.shape[-1], grad_out.shape[-1]
    g = grad_out.reshape(-1, d_out)
    correction_grad = needs_x and reads.shape[0] > trained_rows
    d_z, stacked = heads_backward(g @ writes, z, dropout_seed, layout, ctx.keep_prob, correction_grad, reads.dtype, g.dtype)

    grad_A = grad_B = grad_router = grad_x = None
    if needs_B:
        grad_writes_t = (stacked.T @ g).float() * ctx.scaling  # (N*r, d_out), as the PyTorch path
        grad_B = grad_writes_t.view(layout.heads, rank, d_out).transpose(1, 2).to(ctx.param_dtype, memory_format=torch.contiguous_format)
    if needs_A or needs_router:
        grad_trained = (d_z[:, :trained_rows].T @ x.reshape(-1, d_in).to(reads.dtype)).to(ctx.param_dtype)
        grad_A, grad_router = grad_trained[:rank], grad_trained[rank:] if layout.routed else None
    if needs_x:
        rows = reads.shape[0] if correction_grad else trained_rows
        grad_x = (d_z[:, :rows] @ reads[:rows]).view(x.shape).to(x.dtype)
    return grad_x, None, grad_out, grad_A, grad_B, grad_router, *_NO_GRADS
