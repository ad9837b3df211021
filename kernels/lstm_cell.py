"""LSTM cell in Triton: cuBLAS (torch.mm) for the two matrix products, one fused kernel for the gate math each way."""
import torch
import triton
import triton.language as tl

BLOCK_H = 128


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: tl has no tanh on every Triton version we support
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _lstm_cell_fwd_kernel(gates_ptr, b_ih_ptr, b_hh_ptr, cx_ptr, c_ptr, h_ptr, H,
                          HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    # One program per (batch row, block of hidden units); gates holds the pre-activations on entry.
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    g_row = gates_ptr + row.to(tl.int64) * 4 * H
    pre_i = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC)
    pre_f = tl.load(g_row + H + cols, mask=mask, other=0.0).to(ACC)
    pre_g = tl.load(g_row + 2 * H + cols, mask=mask, other=0.0).to(ACC)
    pre_o = tl.load(g_row + 3 * H + cols, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        pre_i += tl.load(b_ih_ptr + cols, mask=mask, other=0.0).to(ACC) + tl.load(
            b_hh_ptr + cols, mask=mask, other=0.0).to(ACC)
        pre_f += tl.load(b_ih_ptr + H + cols, mask=mask, other=0.0).to(ACC) + tl.load(
            b_hh_ptr + H + cols, mask=mask, other=0.0).to(ACC)
        pre_g += tl.load(b_ih_ptr + 2 * H + cols, mask=mask, other=0.0).to(ACC) + tl.load(
            b_hh_ptr + 2 * H + cols, mask=mask, other=0.0).to(ACC)
        pre_o += tl.load(b_ih_ptr + 3 * H + cols, mask=mask, other=0.0).to(ACC) + tl.load(
            b_hh_ptr + 3 * H + cols, mask=mask, other=0.0).to(ACC)
    i = _sigmoid(pre_i)
    f = _sigmoid(pre_f)
    g = _tanh(pre_g)
    o = _sigmoid(pre_o)
    state = row.to(tl.int64) * H + cols
    c = f * tl.load(cx_ptr + state, mask=mask, other=0.0).to(ACC) + i * g
    out_ty = gates_ptr.dtype.element_ty
    tl.store(g_row + cols, i.to(out_ty), mask=mask)
    tl.store(g_row + H + cols, f.to(out_ty), mask=mask)
    tl.store(g_row + 2 * H + cols, g.to(out_ty), mask=mask)
    tl.store(g_row + 3 * H + cols, o.to(out_ty), mask=mask)
    tl.store(c_ptr + state, c.to(out_ty), mask=mask)
    tl.store(h_ptr + state, (o * _tanh(c)).to(out_ty), mask=mask)


@triton.jit
def _lstm_cell_bwd_kernel(gates_ptr, cx_ptr, c_ptr, grad_h_ptr, grad_c_ptr, grad_gates_ptr, grad_cx_ptr, H,
                          ACC: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    g_row = gates_ptr + row.to(tl.int64) * 4 * H
    i = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC)
    f = tl.load(g_row + H + cols, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_row + 2 * H + cols, mask=mask, other=0.0).to(ACC)
    o = tl.load(g_row + 3 * H + cols, mask=mask, other=0.0).to(ACC)
    state = row.to(tl.int64) * H + cols
    tc = _tanh(tl.load(c_ptr + state, mask=mask, other=0.0).to(ACC))
    cx = tl.load(cx_ptr + state, mask=mask, other=0.0).to(ACC)
    dh = tl.load(grad_h_ptr + state, mask=mask, other=0.0).to(ACC)
    dc = tl.load(grad_c_ptr + state, mask=mask, other=0.0).to(ACC) + dh * o * (1.0 - tc * tc)
    out_ty = grad_gates_ptr.dtype.element_ty
    dg_row = grad_gates_ptr + row.to(tl.int64) * 4 * H
    tl.store(dg_row + cols, (dc * g * i * (1.0 - i)).to(out_ty), mask=mask)
    tl.store(dg_row + H + cols, (dc * cx * f * (1.0 - f)).to(out_ty), mask=mask)
    tl.store(dg_row + 2 * H + cols, (dc * i * (1.0 - g * g)).to(out_ty), mask=mask)
    tl.store(dg_row + 3 * H + cols, (dh * tc * o * (1.0 - o)).to(out_ty), mask=mask)
    tl.store(grad_cx_ptr + state, (dc * f).to(out_ty), mask=mask)


def _grid(B, H):
    return (B, triton.cdiv(H, BLOCK_H))


def _accumulator(dtype):
    """float32 math for every dtype but float64, which stays exact for gradcheck."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """(h, c, gates) of one LSTM step; gates are the activated (i, f, g, o) kept for the backward."""
    B, H = hx.shape
    gates = torch.mm(input, w_ih.t())
    gates.addmm_(hx, w_hh.t())
    h = torch.empty_like(hx, memory_format=torch.contiguous_format)
    c = torch.empty_like(h)
    if B * H:
        has_bias = b_ih is not None
        _lstm_cell_fwd_kernel[_grid(B, H)](
            gates, b_ih.contiguous() if has_bias else gates, b_hh.contiguous() if has_bias else gates,
            cx.contiguous(), c, h, H, HAS_BIAS=has_bias, ACC=_accumulator(gates.dtype), BLOCK_H=BLOCK_H)
    return h, c, gates


def lstm_cell_bwd(grad_h, grad_c, input, hx, cx, w_ih, w_hh, gates, c):
    """(grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b) of one LSTM step."""
    B, H = hx.shape
    grad_gates = torch.empty_like(gates, memory_format=torch.contiguous_format)
    grad_cx = torch.empty_like(hx, memory_format=torch.contiguous_format)
    if B * H:
        _lstm_cell_bwd_kernel[_grid(B, H)](
            gates.contiguous(), cx.contiguous(), c.contiguous(), grad_h.contiguous(), grad_c.contiguous(),
            grad_gates, grad_cx, H, ACC=_accumulator(gates.dtype), BLOCK_H=BLOCK_H)
    return (grad_gates.mm(w_ih), grad_gates.mm(w_hh), grad_cx, grad_gates.t().mm(input), grad_gates.t().mm(hx),
            grad_gates.sum(0))
