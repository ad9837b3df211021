"""attention: scores over the source, a masked softmax and the weighted sum of values, fused.

Scores: "dot" (Luong, e_s = q . k_s; "general" is dot with q or k already multiplied by W) or "additive"
(Bahdanau, e_s = v . tanh(q + k_s), q and k_s already projected). Backends: `reference` (the naive torch chain
below, the oracle every test uses), `cpu` and `cuda` (C++ ops fastseq2seq::attention_fwd/_bwd from csrc/),
`triton` (fastseq2seq::attention_fwd_triton/_bwd_triton around fastseq2seq.kernels.attention).

The fused ops take the query as [B, T, D] and padding as an optional bool mask [B, S] (True = real position):
`lengths` becomes that mask here, in `_as_mask`, and nowhere else. A missing `v` means dot scores. The forward
saves only the per-row log-sum-exp of the scores; the backward recomputes the weights from it.
"""
from typing import Optional

import torch
from torch import Tensor

from fastseq2seq.backends import select_backend
from fastseq2seq.ops._checks import (check_float_dtype, check_lengths, check_lengths_range, check_like, check_rank,
                                     check_shape, check_tensor, fail)
from fastseq2seq.ops._registry import register_fused_ops

SCORES = ("dot", "additive")


def _as_mask(mask, lengths, S):
    """The one place padding changes form: lengths [B] (padding at the end) become a bool mask [B, S]."""
    if lengths is None:
        return mask
    return torch.arange(S, device=lengths.device) < lengths.unsqueeze(1)


def attention_reference(query, keys, values, *, mask=None, lengths=None, score="dot", v=None, return_weights=True):
    """The naive torch chain: scores, masked_fill, softmax, bmm. Same arguments and results as `attention`."""
    single_step = query.dim() == 2
    q = query.unsqueeze(1) if single_step else query
    if score == "dot":
        scores = q @ keys.transpose(1, 2)
    else:
        scores = torch.tanh(q.unsqueeze(2) + keys.unsqueeze(1)) @ v
    real = _as_mask(mask, lengths, keys.shape[1])
    if real is None:
        weights = torch.softmax(scores, dim=-1)
    else:
        real = real.unsqueeze(1).expand_as(scores)
        scores = scores.masked_fill(~real, float("-inf"))
        # A row without a real position would give NaN weights and NaN gradients: give it finite dummy scores,
        # whose weights the last masked_fill zeroes.
        scores = scores.masked_fill(~real.any(-1, keepdim=True), 0.0)
        weights = torch.softmax(scores, dim=-1).masked_fill(~real, 0.0)
    context = weights @ values
    if single_step:
        context, weights = context.squeeze(1), weights.squeeze(1)
    return context, (weights if return_weights else None)


def check_attention_args(query, keys, values, mask, lengths, score, v, backend):
    check_tensor(query, "query")
    if query.dim() not in (2, 3):
        fail("query", f"expected a 2-D [B, D] or 3-D [B, T, D] tensor, got shape {tuple(query.shape)}")
    check_rank(keys, "keys", 3)
    check_rank(values, "values", 3)
    B, D = query.shape[0], query.shape[-1]
    S = keys.shape[1]
    check_float_dtype(query, "query", backend)
    check_shape(keys, "keys", (B, S, D))
    check_shape(values, "values", (B, S, values.shape[2]))
    check_like(keys, "keys", query, "query")
    check_like(values, "values", query, "query")
    if score not in SCORES:
        fail("score", f"expected one of {', '.join(map(repr, SCORES))}, got {score!r}")
    if score == "additive":
        if v is None:
            fail("v", "score='additive' needs v [D], the vector that turns tanh(q + k) into a score")
        check_shape(v, "v", (D,))
        check_like(v, "v", query, "query")
    elif v is not None:
        fail("v", "is only used by score='additive'")
    if mask is not None and lengths is not None:
        fail("mask", "give mask or lengths, not both")
    if mask is not None:
        check_shape(mask, "mask", (B, S))
        if mask.dtype != torch.bool:
            fail("mask", f"expected a bool tensor (True where a source position is real), got {mask.dtype}")
        if mask.device != query.device:
            fail("mask", f"is on {mask.device} but 'query' is on {query.device}")
    if lengths is not None:
        check_lengths(lengths, B, query, "query")
        # A compiled graph cannot branch on the values; the fused ops only ever see the mask made from them.
        if not torch.compiler.is_compiling():
            check_lengths_range(lengths, S, "S = keys.size(1)")


def _check_fused_args(query, keys, values, mask, v, backend):
    """What the fused ops themselves check: query is [B, T, D], padding is a mask, v decides the score."""
    check_rank(query, "query", 3)
    check_attention_args(query, keys, values, mask, None, "dot" if v is None else "additive", v, backend)


@torch.library.custom_op("fastseq2seq::attention_fwd_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _attention_fwd_triton(query: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor], v: Optional[Tensor],
                          return_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check_fused_args(query, keys, values, mask, v, "triton")
    from fastseq2seq.kernels import attention as kernels

    return kernels.attention_fwd(query, keys, values, mask, v, return_weights)


@torch.library.custom_op("fastseq2seq::attention_bwd_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _attention_bwd_triton(grad_context: Tensor, grad_weights: Optional[Tensor], query: Tensor, keys: Tensor,
                          values: Tensor, mask: Optional[Tensor], v: Optional[Tensor],
                          lse: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_fused_args(query, keys, values, mask, v, "triton")
    B, T, _ = query.shape
    S, Dv = keys.shape[1], values.shape[2]
    check_shape(grad_context, "grad_context", (B, T, Dv))
    if grad_weights is not None:
        check_shape(grad_weights, "grad_weights", (B, T, S))
    check_shape(lse, "lse", (B, T))
    from fastseq2seq.kernels import attention as kernels

    return kernels.attention_bwd(grad_context, grad_weights, query, keys, values, mask, v, lse)


def _fwd_fake(query, keys, values, mask, v, return_weights):
    B, T, _ = query.shape
    S, Dv = keys.shape[1], values.shape[2]
    return (query.new_empty(B, T, Dv), query.new_empty(B if return_weights else 0, T, S),
            query.new_empty(B, T, dtype=torch.promote_types(query.dtype, torch.float32)))


def _bwd_fake(grad_context, grad_weights, query, keys, values, mask, v, lse):
    return (torch.empty_like(query), torch.empty_like(keys), torch.empty_like(values),
            query.new_empty(query.shape[2] if v is not None else 0))


def _setup_context(ctx, inputs, output):
    query, keys, values, mask, v, _ = inputs
    _, _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an unused weights output must not cost a [B, T, S] tensor of zeros
    ctx.save_for_backward(query, keys, values, mask, v, lse)


def _autograd_backward(bwd_op):
    def backward(ctx, grad_context, grad_weights, _grad_lse):
        query, keys, values, mask, v, lse = ctx.saved_tensors
        if grad_weights is not None and grad_weights.numel() == 0:
            grad_weights = None  # the empty placeholder of weights not returned, materialized by AOT autograd
        if grad_context is None:  # only the weights were used
            grad_context = query.new_zeros(*query.shape[:2], values.shape[2])
        grad_query, grad_keys, grad_values, grad_v = bwd_op(grad_context, grad_weights, query, keys, values, mask,
                                                            v, lse)
        return grad_query, grad_keys, grad_values, None, (grad_v if v is not None else None), None

    return backward


_FUSED_OPS = register_fused_ops("attention", _fwd_fake, _bwd_fake, _autograd_backward, _setup_context)


def attention(query, keys, values, *, mask=None, lengths=None, score="dot", v=None, return_weights=True,
              backend=None):
    """Masked attention of query [B, D] (one decoder step) or [B, T, D] over keys [B, S, D] and values [B, S, Dv].

    mask: bool [B, S], True where a source position is real; or lengths: int64 [B], padding at the end; neither:
    all real. Returns (context [B, Dv] or [B, T, Dv], weights [B, S] or [B, T, S], or None if not
    return_weights). A row without a real position gets zero context, zero weights and zero gradients.
    """
    check_tensor(query, "query")
    name = select_backend(backend, query.device, "attention")
    check_attention_args(query, keys, values, mask, lengths, score, v, name)
    if name == "reference":
        return attention_reference(query, keys, values, mask=mask, lengths=lengths, score=score, v=v,
                                   return_weights=return_weights)
    single_step = query.dim() == 2
    q = query.unsqueeze(1) if single_step else query
    context, weights, _ = _FUSED_OPS[name][0](q, keys, values, _as_mask(mask, lengths, keys.shape[1]), v,
                                              return_weights)
    if single_step:
        context, weights = context.squeeze(1), weights.squeeze(1)
    return context, (weights if return_weights else None)
