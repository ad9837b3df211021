"""Attention in Triton: a flash-attention style forward (online softmax over tiles of S, tiles of T query rows)
and a fused backward that recomputes the weights from the saved log-sum-exp.

Scores are built in chunks of D, so the [T, S, D] tanh tensor of additive scores exists only one
[BLOCK_T, BLOCK_S, BLOCK_DK] tile at a time. The backward runs two kernels: per tile of query rows the
softmax-backward row term delta = sum_s p_s dp_s, then per tile of source positions the gradients of keys and
values (owned by that program) while adding its share of the query and v gradients atomically.
"""
import torch
import triton
import triton.language as tl

from fastseq2seq.backends import triton_interpreted
from fastseq2seq.kernels.lstm_cell import _tanh

BLOCK_T = 16  # tl.dot needs every block dimension >= 16


@triton.jit
def _scores(q_ptr, k_ptr, v_ptr, offs_t, offs_s, T, S, D, ADDITIVE: tl.constexpr, ACC: tl.constexpr,
            DOT_TY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr):
    """[BLOCK_T, BLOCK_S] scores of query rows offs_t against positions offs_s; q_ptr/k_ptr at this batch row."""
    scores = tl.zeros([BLOCK_T, BLOCK_S], dtype=ACC)
    for d0 in range(0, D, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        d_ok = offs_d < D
        q = tl.load(q_ptr + offs_t[:, None] * D + offs_d[None, :], mask=(offs_t < T)[:, None] & d_ok[None, :],
                    other=0.0)
        k = tl.load(k_ptr + offs_s[:, None] * D + offs_d[None, :], mask=(offs_s < S)[:, None] & d_ok[None, :],
                    other=0.0)
        if ADDITIVE:
            v = tl.load(v_ptr + offs_d, mask=d_ok, other=0.0).to(ACC)
            th = _tanh(q.to(ACC)[:, None, :] + k.to(ACC)[None, :, :])
            scores += tl.sum(th * v[None, None, :], axis=2)
        else:
            scores += tl.dot(q.to(DOT_TY), tl.trans(k.to(DOT_TY)), out_dtype=ACC, input_precision="ieee")
    return scores


@triton.jit
def _real_positions(mask_ptr, offs_s, S, HAS_MASK: tl.constexpr):
    real = offs_s < S
    if HAS_MASK:
        real = real & (tl.load(mask_ptr + offs_s, mask=offs_s < S, other=0) != 0)
    return real


@triton.jit
def _attention_fwd_kernel(q_ptr, k_ptr, val_ptr, mask_ptr, v_ptr, ctx_ptr, w_ptr, lse_ptr, T, S, D, DV,
                          ADDITIVE: tl.constexpr, HAS_MASK: tl.constexpr, RETURN_WEIGHTS: tl.constexpr,
                          ACC: tl.constexpr, DOT_TY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    # One program per (batch row, tile of query rows); S streams through in tiles.
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_row, k_row, val_row, mask_row = q_ptr + b * T * D, k_ptr + b * S * D, val_ptr + b * S * DV, mask_ptr + b * S
    running_max = tl.full([BLOCK_T], float("-inf"), ACC)
    running_sum = tl.zeros([BLOCK_T], ACC)
    acc = tl.zeros([BLOCK_T, BLOCK_DV], ACC)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        real = _real_positions(mask_row, offs_s, S, HAS_MASK)
        scores = _scores(q_row, k_row, v_ptr, offs_t, offs_s, T, S, D, ADDITIVE, ACC, DOT_TY, BLOCK_T, BLOCK_S,
                         BLOCK_DK)
        scores = tl.where(real[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with no real position yet
        alpha = tl.exp(running_max - safe_max)
        p = tl.exp(scores - safe_max[:, None])
        running_sum = running_sum * alpha + tl.sum(p, axis=1)
        vals = tl.load(val_row + offs_s[:, None] * DV + offs_dv[None, :],
                       mask=(offs_s < S)[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_TY), vals.to(DOT_TY), out_dtype=ACC, input_precision="ieee")
        running_max = new_max
    empty = running_sum == 0.0
    context = acc / tl.where(empty, 1.0, running_sum)[:, None]
    lse = tl.where(empty, float("inf"), running_max + tl.log(tl.where(empty, 1.0, running_sum)))
    t_ok = offs_t < T
    tl.store(ctx_ptr + (b * T + offs_t[:, None]) * DV + offs_dv[None, :], context.to(ctx_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_dv < DV)[None, :])
    tl.store(lse_ptr + b * T + offs_t, lse, mask=t_ok)
    if RETURN_WEIGHTS:  # a second pass over S, now that the log-sum-exp is known
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            real = _real_positions(mask_row, offs_s, S, HAS_MASK)
            scores = _scores(q_row, k_row, v_ptr, offs_t, offs_s, T, S, D, ADDITIVE, ACC, DOT_TY, BLOCK_T, BLOCK_S,
                             BLOCK_DK)
            weights = tl.where(real[None, :], tl.exp(scores - lse[:, None]), 0.0)
            tl.store(w_ptr + (b * T + offs_t[:, None]) * S + offs_s[None, :], weights.to(w_ptr.dtype.element_ty),
                     mask=t_ok[:, None] & (offs_s < S)[None, :])


@triton.jit
def _weights_and_grad(q_row, k_row, val_row, mask_row, v_ptr, go_row, gw_row, lse, offs_t, offs_s, T, S, D, DV,
                      ADDITIVE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr,
                      ACC: tl.constexpr, DOT_TY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Recomputed weights p and their upstream gradient dp = dO . V^T (+ grad of the weights), one tile."""
    real = _real_positions(mask_row, offs_s, S, HAS_MASK)
    scores = _scores(q_row, k_row, v_ptr, offs_t, offs_s, T, S, D, ADDITIVE, ACC, DOT_TY, BLOCK_T, BLOCK_S, BLOCK_DK)
    # lse is +inf on rows without a real position: their p is 0
    p = tl.where(real[None, :], tl.exp(scores - lse[:, None]), 0.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    go = tl.load(go_row + offs_t[:, None] * DV + offs_dv[None, :], mask=(offs_t < T)[:, None] & (offs_dv < DV)[None, :],
                 other=0.0)
    vals = tl.load(val_row + offs_s[:, None] * DV + offs_dv[None, :],
                   mask=(offs_s < S)[:, None] & (offs_dv < DV)[None, :], other=0.0)
    dp = tl.dot(go.to(DOT_TY), tl.trans(vals.to(DOT_TY)), out_dtype=ACC, input_precision="ieee")
    if HAS_GRAD_WEIGHTS:
        dp += tl.load(gw_row + offs_t[:, None] * S + offs_s[None, :], mask=(offs_t < T)[:, None] & (offs_s < S)[None, :],
                      other=0.0).to(ACC)
    return p, dp, go


@triton.jit
def _attention_bwd_delta_kernel(q_ptr, k_ptr, val_ptr, mask_ptr, v_ptr, go_ptr, gw_ptr, lse_ptr, delta_ptr, T, S, D,
                                DV, ADDITIVE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr,
                                ACC: tl.constexpr, DOT_TY: tl.constexpr, BLOCK_T: tl.constexpr,
                                BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    # delta = sum_s p_s dp_s per query row: dO . context alone would miss a gradient on the weights output.
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    lse = tl.load(lse_ptr + b * T + offs_t, mask=offs_t < T, other=float("inf"))
    delta = tl.zeros([BLOCK_T], ACC)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        p, dp, _ = _weights_and_grad(q_ptr + b * T * D, k_ptr + b * S * D, val_ptr + b * S * DV, mask_ptr + b * S,
                                     v_ptr, go_ptr + b * T * DV, gw_ptr + b * T * S, lse, offs_t, offs_s, T, S, D,
                                     DV, ADDITIVE, HAS_MASK, HAS_GRAD_WEIGHTS, ACC, DOT_TY, BLOCK_T, BLOCK_S,
                                     BLOCK_DK, BLOCK_DV)
        delta += tl.sum(p * dp, axis=1)
    tl.store(delta_ptr + b * T + offs_t, delta, mask=offs_t < T)


@triton.jit
def _attention_bwd_kernel(q_ptr, k_ptr, val_ptr, mask_ptr, v_ptr, go_ptr, gw_ptr, lse_ptr, delta_ptr, dq_ptr,
                          dk_ptr, dval_ptr, dv_ptr, T, S, D, DV, ADDITIVE: tl.constexpr, HAS_MASK: tl.constexpr,
                          HAS_GRAD_WEIGHTS: tl.constexpr, ACC: tl.constexpr, DOT_TY: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr,
                          BLOCK_DV: tl.constexpr):
    # One program per (batch row, tile of source positions): it alone writes those keys' and values' gradients.
    # dq_ptr and dk_ptr are zeroed ACC buffers, dv_ptr (the grad of v) too.
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    offs_dv = tl.arange(0, BLOCK_DV)
    q_row, k_row = q_ptr + b * T * D, k_ptr + b * S * D
    grad_values = tl.zeros([BLOCK_S, BLOCK_DV], ACC)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        lse = tl.load(lse_ptr + b * T + offs_t, mask=t_ok, other=float("inf"))
        delta = tl.load(delta_ptr + b * T + offs_t, mask=t_ok, other=0.0)
        p, dp, go = _weights_and_grad(q_row, k_row, val_ptr + b * S * DV, mask_ptr + b * S, v_ptr,
                                      go_ptr + b * T * DV, gw_ptr + b * T * S, lse, offs_t, offs_s, T, S, D, DV,
                                      ADDITIVE, HAS_MASK, HAS_GRAD_WEIGHTS, ACC, DOT_TY, BLOCK_T, BLOCK_S, BLOCK_DK,
                                      BLOCK_DV)
        ds = p * (dp - delta[:, None])
        grad_values += tl.dot(tl.trans(p).to(DOT_TY), go.to(DOT_TY), out_dtype=ACC, input_precision="ieee")
        for d0 in range(0, D, BLOCK_DK):
            offs_d = d0 + tl.arange(0, BLOCK_DK)
            d_ok = offs_d < D
            q = tl.load(q_row + offs_t[:, None] * D + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                        other=0.0).to(ACC)
            k = tl.load(k_row + offs_s[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                        other=0.0).to(ACC)
            if ADDITIVE:  # tanh recomputed, never stored
                v = tl.load(v_ptr + offs_d, mask=d_ok, other=0.0).to(ACC)
                th = _tanh(q[:, None, :] + k[None, :, :])
                g = ds[:, :, None] * v[None, None, :] * (1.0 - th * th)
                dq = tl.sum(g, axis=1)
                dk = tl.sum(g, axis=0)
                tl.atomic_add(dv_ptr + offs_d, tl.sum(tl.sum(ds[:, :, None] * th, axis=0), axis=0), mask=d_ok)
            else:
                dq = tl.dot(ds, k, out_dtype=ACC, input_precision="ieee")
                dk = tl.dot(tl.trans(ds), q, out_dtype=ACC, input_precision="ieee")
            tl.atomic_add(dq_ptr + (b * T + offs_t[:, None]) * D + offs_d[None, :], dq,
                          mask=t_ok[:, None] & d_ok[None, :])
            dk_at = dk_ptr + (b * S + offs_s[:, None]) * D + offs_d[None, :]
            dk_mask = s_ok[:, None] & d_ok[None, :]
            tl.store(dk_at, tl.load(dk_at, mask=dk_mask, other=0.0) + dk, mask=dk_mask)
    tl.store(dval_ptr + (b * S + offs_s[:, None]) * DV + offs_dv[None, :], grad_values.to(dval_ptr.dtype.element_ty),
             mask=s_ok[:, None] & (offs_dv < DV)[None, :])


def _accumulator(dtype):
    """float32 math for every dtype but float64, which stays exact for gradcheck."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_type(dtype):
    """Half-precision inputs feed tl.dot as they are (tensor cores); float32 and float64 keep full precision."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, _accumulator(dtype))


def _blocks(D, DV, additive):
    # Additive scores hold a [BLOCK_T, BLOCK_S, BLOCK_DK] tanh tile; the interpreter pays per element.
    block_s = 16 if triton_interpreted() or additive else 32
    block_dk = 16 if additive else min(64, max(16, triton.next_power_of_2(D)))
    return dict(BLOCK_T=BLOCK_T, BLOCK_S=block_s, BLOCK_DK=block_dk, BLOCK_DV=max(16, triton.next_power_of_2(DV)))


def _common(query, keys, values, mask, v):
    """Contiguous inputs, placeholder pointers for absent ones, and the compile-time switches."""
    q, k, vals = query.contiguous(), keys.contiguous(), values.contiguous()
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else q
    v_c = v.contiguous() if v is not None else q
    flags = dict(ADDITIVE=v is not None, HAS_MASK=mask is not None, ACC=_accumulator(q.dtype),
                 DOT_TY=_dot_type(q.dtype), **_blocks(q.shape[2], vals.shape[2], v is not None))
    return q, k, vals, mask_u8, v_c, flags


def attention_fwd(query, keys, values, mask, v, return_weights):
    """(context [B, T, Dv], weights [B, T, S] or [0, T, S], lse [B, T])."""
    B, T, D = query.shape
    S, DV = keys.shape[1], values.shape[2]
    q, k, vals, mask_u8, v_c, flags = _common(query, keys, values, mask, v)
    context = q.new_empty(B, T, DV)
    weights = q.new_empty(B if return_weights else 0, T, S)
    lse = q.new_empty(B, T, dtype=torch.promote_types(q.dtype, torch.float32))  # float32, float64 for float64
    if B * T:
        _attention_fwd_kernel[(B, triton.cdiv(T, BLOCK_T))](
            q, k, vals, mask_u8, v_c, context, weights if return_weights else context, lse, T, S, D, DV,
            RETURN_WEIGHTS=return_weights, **flags)
    return context, weights, lse


def attention_bwd(grad_context, grad_weights, query, keys, values, mask, v, lse):
    """(grad_query, grad_keys, grad_values, grad_v); grad_v is [0] for dot scores."""
    B, T, D = query.shape
    S, DV = keys.shape[1], values.shape[2]
    q, k, vals, mask_u8, v_c, flags = _common(query, keys, values, mask, v)
    acc_dtype = lse.dtype
    go = grad_context.contiguous()
    gw = grad_weights.contiguous() if grad_weights is not None else go
    lse = lse.contiguous()
    grad_query = torch.zeros(B, T, D, dtype=acc_dtype, device=q.device)
    grad_keys = torch.zeros(B, S, D, dtype=acc_dtype, device=q.device)
    grad_values = q.new_empty(B, S, DV)
    grad_v = torch.zeros(D if v is not None else 0, dtype=acc_dtype, device=q.device)
    if B * T * S:
        delta = torch.empty(B, T, dtype=acc_dtype, device=q.device)
        has_gw = grad_weights is not None
        _attention_bwd_delta_kernel[(B, triton.cdiv(T, BLOCK_T))](
            q, k, vals, mask_u8, v_c, go, gw, lse, delta, T, S, D, DV, HAS_GRAD_WEIGHTS=has_gw, **flags)
        _attention_bwd_kernel[(B, triton.cdiv(S, flags["BLOCK_S"]))](
            q, k, vals, mask_u8, v_c, go, gw, lse, delta, grad_query, grad_keys, grad_values,
            grad_v if v is not None else grad_query, T, S, D, DV, HAS_GRAD_WEIGHTS=has_gw, **flags)
    else:
        grad_values.zero_()
    return grad_query.to(q.dtype), grad_keys.to(q.dtype), grad_values, grad_v.to(q.dtype)
