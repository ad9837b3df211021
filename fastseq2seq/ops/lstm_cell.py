"""lstm_cell: one fused LSTM step, torch.nn.LSTMCell's math and gate order (i, f, g, o).

Backends: `reference` (pure torch, below: the oracle every test uses), `cpu` and `cuda`
(C++ ops fastseq2seq::lstm_cell_fwd/_bwd from csrc/), `triton` (fastseq2seq::lstm_cell_fwd_triton/_bwd_triton,
defined here around fastseq2seq.kernels.lstm_cell). Each fused op saves the activated gates for its backward op.
"""
from typing import Optional

import torch
from torch import Tensor

from fastseq2seq.backends import select_backend
from fastseq2seq.ops._checks import check_lstm_args, check_rank, check_shape, check_state_pair
from fastseq2seq.ops._registry import register_fused_ops


def lstm_cell_reference(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    h, c = hx
    gates = input @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def check_lstm_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend):
    check_lstm_args(input, 2, hx, cx, w_ih, w_hh, b_ih, b_hh, backend)


@torch.library.custom_op("fastseq2seq::lstm_cell_fwd_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _lstm_cell_fwd_triton(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
                          b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    check_lstm_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh, "triton")
    from fastseq2seq.kernels import lstm_cell as kernels

    return kernels.lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh)


@torch.library.custom_op("fastseq2seq::lstm_cell_bwd_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _lstm_cell_bwd_triton(grad_h: Tensor, grad_c: Tensor, input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor,
                          w_hh: Tensor, gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                             Tensor]:
    check_lstm_cell_args(input, hx, cx, w_ih, w_hh, None, None, "triton")
    B, H = hx.shape
    for t, arg, shape in ((grad_h, "grad_h", (B, H)), (grad_c, "grad_c", (B, H)), (gates, "gates", (B, 4 * H)),
                          (c, "c", (B, H))):
        check_shape(t, arg, shape)
    from fastseq2seq.kernels import lstm_cell as kernels

    return kernels.lstm_cell_bwd(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, c)


def _fwd_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    B, H = hx.shape
    return input.new_empty(B, H), input.new_empty(B, H), input.new_empty(B, 4 * H)


def _bwd_fake(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, c):
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(cx), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_ih.new_empty(w_ih.shape[0]))


def _setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, _ = inputs
    _, c, gates = output
    ctx.mark_non_differentiable(gates)
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, gates, c)
    ctx.has_bias = b_ih is not None


def _autograd_backward(bwd_op):
    def backward(ctx, grad_h, grad_c, _grad_gates):
        grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b = bwd_op(grad_h, grad_c, *ctx.saved_tensors)
        grad_bias = grad_b if ctx.has_bias else None
        return grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_bias

    return backward


_FUSED_OPS = register_fused_ops("lstm_cell", _fwd_fake, _bwd_fake, _autograd_backward, _setup_context)


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend=None):
    """One LSTM step. input [B, I], hx = (h [B, H], c [B, H]) or None for zeros; returns (h', c')."""
    check_rank(input, "input", 2)
    if hx is None:
        zeros = input.new_zeros(input.shape[0], w_hh.shape[-1])
        hx = (zeros, zeros)
    h, c = check_state_pair(hx)
    name = select_backend(backend, input.device, "lstm_cell")
    check_lstm_cell_args(input, h, c, w_ih, w_hh, b_ih, b_hh, name)
    if name == "reference":
        return lstm_cell_reference(input, (h, c), w_ih, w_hh, b_ih, b_hh)
    h_new, c_new, _ = _FUSED_OPS[name][0](input, h, c, w_ih, w_hh, b_ih, b_hh)
    return h_new, c_new
