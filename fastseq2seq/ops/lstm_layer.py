"""lstm_layer: the whole recurrence of one direction of one LSTM layer inside one op, with variable lengths.

torch.nn.LSTM's math and gate order (i, f, g, o). With `lengths`, a row's state stops changing after its last valid
step, its outputs past its length are zero and (h_n, c_n) is its state at its last valid step: what torch.nn.LSTM
gives for a PackedSequence. `reverse=True` runs each row from its own last valid step back to step 0.

Backends: `reference` (pure torch loop over steps, below: the oracle every test uses), `cpu` and `cuda` (C++ ops
fastseq2seq::lstm_layer_fwd/_bwd from csrc/), `triton` (fastseq2seq::lstm_layer_fwd_triton/_bwd_triton, defined here
around fastseq2seq.kernels.lstm_layer). Each fused forward returns (output, h_n, c_n, gates, cells): the activated
gates [T, B, 4H] and cell states [T, B, H] of every step are what its backward op needs besides the inputs.
FASTSEQ2SEQ_LSTM_RECURRENCE (auto | per-step | persistent, and graph for triton) picks how the cuda and triton
forwards run the recurrence; `auto` is the per-step path (see the README).
"""
import os
from typing import Optional

import torch
from torch import Tensor

from fastseq2seq.backends import select_backend
from fastseq2seq.ops._checks import (check_lengths, check_lengths_range, check_lstm_args, check_rank, check_shape,
                                     check_state_pair, check_tensor)
from fastseq2seq.ops._registry import register_fused_ops
from fastseq2seq.ops.lstm_cell import lstm_cell_reference


def lstm_layer_reference(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, lengths=None, reverse=False):
    """The oracle: one lstm_cell_reference per step; rows past their length keep their state and output zeros."""
    T, B, _ = input.shape
    h, c = hx
    steps = range(T - 1, -1, -1) if reverse else range(T)
    outputs = [None] * T
    for t in steps:
        h_new, c_new = lstm_cell_reference(input[t], (h, c), w_ih, w_hh, b_ih, b_hh)
        if lengths is not None:
            valid = (lengths > t).unsqueeze(1)
            h_new, c_new = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
            outputs[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
        else:
            outputs[t] = h_new
        h, c = h_new, c_new
    output = torch.stack(outputs) if T else input.new_zeros(0, B, h.shape[1])
    return output, (h, c)


def persistent_recurrence_requested():
    """FASTSEQ2SEQ_LSTM_RECURRENCE=persistent: the cuda and triton forwards run the persistent kernels where they fit
    (the C++ and Triton sides validate the value)."""
    return os.environ.get("FASTSEQ2SEQ_LSTM_RECURRENCE") == "persistent"


def check_lstm_layer_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths, backend):
    """Ranks, shapes, dtypes and devices; the C++ kernels check the same (csrc/lstm_layer.h)."""
    check_lstm_args(input, 3, hx, cx, w_ih, w_hh, b_ih, b_hh, backend)
    if lengths is not None:
        check_lengths(lengths, input.shape[1], input, "input")


@torch.library.custom_op("fastseq2seq::lstm_layer_fwd_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _lstm_layer_fwd_triton(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                           b_hh: Optional[Tensor], lengths: Optional[Tensor],
                           reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_lstm_layer_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths, "triton")
    check_lengths_range(lengths, input.shape[0], "T = input.size(0)")
    from fastseq2seq.kernels import lstm_layer as kernels

    return kernels.lstm_layer_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths, reverse)


@torch.library.custom_op("fastseq2seq::lstm_layer_bwd_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _lstm_layer_bwd_triton(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, input: Tensor, hx: Tensor,
                           cx: Tensor, w_ih: Tensor, w_hh: Tensor, lengths: Optional[Tensor], reverse: bool,
                           output: Tensor, gates: Tensor,
                           cells: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_lstm_layer_args(input, hx, cx, w_ih, w_hh, None, None, lengths, "triton")
    check_lengths_range(lengths, input.shape[0], "T = input.size(0)")
    T, B, _ = input.shape
    H = hx.shape[1]
    for t, arg, shape in ((grad_output, "grad_output", (T, B, H)), (grad_h_n, "grad_h_n", (B, H)),
                          (grad_c_n, "grad_c_n", (B, H)), (output, "output", (T, B, H)),
                          (gates, "gates", (T, B, 4 * H)), (cells, "cells", (T, B, H))):
        check_shape(t, arg, shape)
    from fastseq2seq.kernels import lstm_layer as kernels

    return kernels.lstm_layer_bwd(grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, lengths, reverse,
                                  output, gates, cells)


def _fwd_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    T, B, _ = input.shape
    H = hx.shape[1]
    return (input.new_empty(T, B, H), hx.new_empty(B, H), hx.new_empty(B, H), input.new_empty(T, B, 4 * H),
            input.new_empty(T, B, H))


def _bwd_fake(grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, lengths, reverse, output, gates, cells):
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(hx, memory_format=torch.contiguous_format),
            torch.empty_like(cx, memory_format=torch.contiguous_format),
            torch.empty_like(w_ih, memory_format=torch.contiguous_format),
            torch.empty_like(w_hh, memory_format=torch.contiguous_format), w_ih.new_empty(w_ih.shape[0]))


def _setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, _, lengths, reverse = inputs
    out, _, _, gates, cells = output
    ctx.mark_non_differentiable(gates, cells)
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, lengths, out, gates, cells)
    ctx.reverse = reverse
    ctx.has_bias = b_ih is not None


def _autograd_backward(bwd_op):
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        input, hx, cx, w_ih, w_hh, lengths, out, gates, cells = ctx.saved_tensors
        grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b = bwd_op(
            grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, lengths, ctx.reverse, out, gates, cells)
        grad_bias = grad_b if ctx.has_bias else None
        return grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_bias, None, None

    return backward


_FUSED_OPS = register_fused_ops("lstm_layer", _fwd_fake, _bwd_fake, _autograd_backward, _setup_context)


def lstm_layer(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, lengths=None, reverse=False, backend=None):
    """One direction of one LSTM layer over whole sequences.

    input [T, B, I]; hx = (h0 [B, H], c0 [B, H]) or None for zeros; lengths: None (every row runs T steps) or int64
    [B] on input's device, any order, each in [0, T]. Returns (output [T, B, H], (h_n, c_n)). T = 0 is allowed:
    an empty output and (h_n, c_n) = hx.
    """
    check_rank(input, "input", 3)
    if hx is None:
        check_tensor(w_hh, "w_hh")
        zeros = input.new_zeros(input.shape[1], w_hh.shape[-1])
        hx = (zeros, zeros)
    h, c = check_state_pair(hx)
    if lengths is not None:
        check_tensor(lengths, "lengths")
    name = select_backend(backend, input.device, "lstm_layer")
    check_lstm_layer_args(input, h, c, w_ih, w_hh, b_ih, b_hh, lengths, name)
    if name == "reference":
        check_lengths_range(lengths, input.shape[0], "T = input.size(0)")
        return lstm_layer_reference(input, (h, c), w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=reverse)
    output, h_n, c_n, _, _ = _FUSED_OPS[name][0](input, h, c, w_ih, w_hh, b_ih, b_hh, lengths, bool(reverse))
    return output, (h_n, c_n)
