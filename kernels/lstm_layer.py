"""LSTM layer in Triton: one GEMM (torch) for the input projections of all steps, then one launch per step.

Forward: `_lstm_layer_step_fwd_kernel` fuses h_{t-1} W_hh^T (tl.dot over tiles of W_hh) with the gate math, the state
update and the lengths masking. Backward: per step `_lstm_layer_step_bwd_kernel` (the fused elementwise backward)
and one torch.mm for the recurrent gradient dgates_t W_hh; the weight and input gradients are GEMMs after the loop.
The per-step launches come from a Python loop here; capturing them in a CUDA graph is a later step.
"""
import torch
import triton
import triton.language as tl

from fastseq2seq.kernels.lstm_cell import _accumulator, _sigmoid, _tanh

# tl.dot needs every block dimension >= 16 (also under the interpreter).
BLOCK_B = 16
BLOCK_H = 32
BLOCK_K = 32


@triton.jit
def _lstm_layer_step_fwd_kernel(gates_ptr, cells_ptr, out_ptr, h_prev_ptr, h_next_ptr, c_ptr, w_hh_ptr, lengths_ptr,
                                t, B, H, stride_w_row, stride_w_col, HAS_LENGTHS: tl.constexpr, ACC: tl.constexpr,
                                DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    # One program per (block of rows, block of hidden units) of step t. gates_ptr/cells_ptr/out_ptr point at step t;
    # gates holds x_t W_ih^T + biases on entry and the activated gates on exit. h is double-buffered (every program
    # reads all of h_prev), c is updated in place (each program owns its tile).
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < B
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    pre_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    pre_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    pre_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    pre_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h_tile = tl.load(h_prev_ptr + rows64[:, None] * H + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                         other=0.0)
        # W_hh^T tile [BLOCK_K, BLOCK_H] of each gate: rows q*H + cols of W_hh, columns ks
        w_tile = w_hh_ptr + ks[:, None] * stride_w_col + cols[None, :] * stride_w_row
        w_mask = k_mask[:, None] & col_mask[None, :]
        pre_i += tl.dot(h_tile, tl.load(w_tile, mask=w_mask, other=0.0), input_precision=DOT_PRECISION,
                        out_dtype=ACC)
        pre_f += tl.dot(h_tile, tl.load(w_tile + H * stride_w_row, mask=w_mask, other=0.0),
                        input_precision=DOT_PRECISION, out_dtype=ACC)
        pre_g += tl.dot(h_tile, tl.load(w_tile + 2 * H * stride_w_row, mask=w_mask, other=0.0),
                        input_precision=DOT_PRECISION, out_dtype=ACC)
        pre_o += tl.dot(h_tile, tl.load(w_tile + 3 * H * stride_w_row, mask=w_mask, other=0.0),
                        input_precision=DOT_PRECISION, out_dtype=ACC)
    g_tile = gates_ptr + rows64[:, None] * 4 * H + cols[None, :]
    i = _sigmoid(pre_i + tl.load(g_tile, mask=mask, other=0.0).to(ACC))
    f = _sigmoid(pre_f + tl.load(g_tile + H, mask=mask, other=0.0).to(ACC))
    g = _tanh(pre_g + tl.load(g_tile + 2 * H, mask=mask, other=0.0).to(ACC))
    o = _sigmoid(pre_o + tl.load(g_tile + 3 * H, mask=mask, other=0.0).to(ACC))
    state = rows64[:, None] * H + cols[None, :]
    c_prev = tl.load(c_ptr + state, mask=mask, other=0.0).to(ACC)
    h_prev = tl.load(h_prev_ptr + state, mask=mask, other=0.0)
    c = f * c_prev + i * g
    h = o * _tanh(c)
    if HAS_LENGTHS:
        valid = (t < tl.load(lengths_ptr + rows, mask=row_mask, other=0))[:, None]
    else:
        valid = row_mask[:, None]
    out_ty = gates_ptr.dtype.element_ty
    # Past a row's length: zero output and saved buffers, the state carried over unchanged.
    tl.store(g_tile, tl.where(valid, i, 0.0).to(out_ty), mask=mask)
    tl.store(g_tile + H, tl.where(valid, f, 0.0).to(out_ty), mask=mask)
    tl.store(g_tile + 2 * H, tl.where(valid, g, 0.0).to(out_ty), mask=mask)
    tl.store(g_tile + 3 * H, tl.where(valid, o, 0.0).to(out_ty), mask=mask)
    tl.store(cells_ptr + state, tl.where(valid, c, 0.0).to(out_ty), mask=mask)
    tl.store(out_ptr + state, tl.where(valid, h, 0.0).to(out_ty), mask=mask)
    tl.store(c_ptr + state, tl.where(valid, c, c_prev).to(out_ty), mask=mask)
    tl.store(h_next_ptr + state, tl.where(valid, h.to(out_ty), h_prev), mask=mask)


@triton.jit
def _lstm_layer_step_bwd_kernel(gates_ptr, cells_ptr, cells_prev_ptr, c0_ptr, grad_out_ptr, grad_h_n_ptr,
                                grad_c_n_ptr, grad_h_ptr, grad_c_ptr, grad_c_prev_ptr, grad_cx_ptr, grad_gates_ptr,
                                lengths_ptr, t, T, B, H, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                                ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    # The fused elementwise backward of step t. grad_h holds dgates_{t+1} W_hh (the recurrent gradient); the step
    # that produced h_n takes grad_h_n / grad_c_n instead, and the step that consumed (h0, c0) writes grad_cx.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < B
    mask = row_mask[:, None] & (cols < H)[None, :]
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_mask, other=0)
    else:
        length = tl.zeros((BLOCK_B,), dtype=tl.int64) + T
    if REVERSE:
        first, last = length - 1, tl.zeros_like(length)
    else:
        first, last = tl.zeros_like(length), length - 1
    valid = mask & (t < length)[:, None]
    at_first = (t == first)[:, None]
    at_last = (t == last)[:, None]
    rows64 = rows.to(tl.int64)
    state = rows64[:, None] * H + cols[None, :]
    g_tile = gates_ptr + rows64[:, None] * 4 * H + cols[None, :]
    i = tl.load(g_tile, mask=valid, other=0.0).to(ACC)
    f = tl.load(g_tile + H, mask=valid, other=0.0).to(ACC)
    g = tl.load(g_tile + 2 * H, mask=valid, other=0.0).to(ACC)
    o = tl.load(g_tile + 3 * H, mask=valid, other=0.0).to(ACC)
    tc = _tanh(tl.load(cells_ptr + state, mask=valid, other=0.0).to(ACC))
    c_prev = tl.where(at_first, tl.load(c0_ptr + state, mask=valid & at_first, other=0.0),
                      tl.load(cells_prev_ptr + state, mask=valid & ~at_first, other=0.0)).to(ACC)
    dh = tl.load(grad_out_ptr + state, mask=valid, other=0.0).to(ACC) + tl.where(
        at_last, tl.load(grad_h_n_ptr + state, mask=valid & at_last, other=0.0),
        tl.load(grad_h_ptr + state, mask=valid & ~at_last, other=0.0)).to(ACC)
    dc = tl.where(at_last, tl.load(grad_c_n_ptr + state, mask=valid & at_last, other=0.0),
                  tl.load(grad_c_ptr + state, mask=valid & ~at_last, other=0.0)).to(ACC) + dh * o * (1.0 - tc * tc)
    out_ty = grad_gates_ptr.dtype.element_ty
    dg_tile = grad_gates_ptr + rows64[:, None] * 4 * H + cols[None, :]
    # Masked-off loads gave zeros, so rows past their length get zero gate gradients.
    tl.store(dg_tile, (dc * g * i * (1.0 - i)).to(out_ty), mask=mask)
    tl.store(dg_tile + H, (dc * c_prev * f * (1.0 - f)).to(out_ty), mask=mask)
    tl.store(dg_tile + 2 * H, (dc * i * (1.0 - g * g)).to(out_ty), mask=mask)
    tl.store(dg_tile + 3 * H, (dh * tc * o * (1.0 - o)).to(out_ty), mask=mask)
    tl.store(grad_c_prev_ptr + state, (dc * f).to(out_ty), mask=valid & ~at_first)
    tl.store(grad_cx_ptr + state, (dc * f).to(out_ty), mask=valid & at_first)


def _grid(B, H):
    return (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))


def _dot_precision(dtype):
    """Full float32 products unless the user allows TF32 for matmuls, as torch.mm does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def lstm_layer_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """(output, h_n, c_n, gates, cells) over all T steps; gates/cells are the activated gates and cell states."""
    T, B, I = input.shape
    H = hx.shape[1]
    gates = input.new_empty(T, B, 4 * H)
    cells = input.new_empty(T, B, H)
    output = input.new_empty(T, B, H)
    h = hx.contiguous().clone()
    c = cx.contiguous().clone()
    if T * B * H == 0:
        return output, h, c, gates, cells
    projection = gates.view(T * B, 4 * H)
    if b_ih is not None:
        torch.addmm(b_ih + b_hh, input.reshape(T * B, I), w_ih.t(), out=projection)
    else:
        torch.mm(input.reshape(T * B, I), w_ih.t(), out=projection)
    h_next = torch.empty_like(h)
    for s in range(T):
        t = T - 1 - s if reverse else s
        _lstm_layer_step_fwd_kernel[_grid(B, H)](
            gates[t], cells[t], output[t], h, h_next, c, w_hh, lengths if lengths is not None else h, t, B, H,
            w_hh.stride(0), w_hh.stride(1), HAS_LENGTHS=lengths is not None, ACC=_accumulator(input.dtype),
            DOT_PRECISION=_dot_precision(input.dtype), BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
        h, h_next = h_next, h
    return output, h, c, gates, cells


def lstm_layer_bwd(grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, lengths, reverse, output, gates,
                   cells):
    """(grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b) by backpropagation through time."""
    T, B, I = input.shape
    H = hx.shape[1]
    grad_output, grad_h_n, grad_c_n = grad_output.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous()
    gates, cells, c0 = gates.contiguous(), cells.contiguous(), cx.contiguous()
    grad_gates = input.new_empty(T, B, 4 * H)
    grad_cx = grad_c_n.clone()  # rows of length 0 pass the gradient straight through
    grad_h = torch.empty_like(grad_cx)
    grad_c, grad_c_prev = torch.empty_like(grad_cx), torch.empty_like(grad_cx)
    if B * H:
        for s in range(T):
            t = s if reverse else T - 1 - s  # the forward's steps, last first
            t_prev = t + 1 if reverse else t - 1
            _lstm_layer_step_bwd_kernel[_grid(B, H)](
                gates[t], cells[t], cells[t_prev] if 0 <= t_prev < T else c0, c0, grad_output[t], grad_h_n,
                grad_c_n, grad_h, grad_c, grad_c_prev, grad_cx, grad_gates[t],
                lengths if lengths is not None else grad_h, t, T, B, H, REVERSE=reverse,
                HAS_LENGTHS=lengths is not None, ACC=_accumulator(input.dtype), BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H)
            grad_c, grad_c_prev = grad_c_prev, grad_c
            if s + 1 < T:
                torch.mm(grad_gates[t], w_hh, out=grad_h)
    else:
        grad_gates.zero_()
    return _gradients_after_loop(grad_gates, grad_h_n, grad_cx, input, hx, w_ih, w_hh, lengths, reverse, output)


def _gradients_after_loop(grad_gates, grad_h_n, grad_cx, input, hx, w_ih, w_hh, lengths, reverse, output):
    """The large GEMMs over all steps; as lstm_layer_grads_after_loop in csrc/lstm_layer.h."""
    T, B, I = input.shape
    H = hx.shape[1]
    grad_gates_2d = grad_gates.view(T * B, 4 * H)
    # Each row's grad_gates at the step that consumed (h0, c0); zero for rows of length 0.
    if lengths is None:
        length = torch.full((B,), T, dtype=torch.int64, device=input.device)
    else:
        length = lengths
    first = (length - 1).clamp(min=0) if reverse else torch.zeros_like(length)
    if T:
        grad_gates_first = grad_gates[first, torch.arange(B, device=input.device)] * (length > 0).unsqueeze(1)
    else:
        grad_gates_first = grad_gates.new_zeros(B, 4 * H)
    grad_hx = grad_gates_first.mm(w_hh) + grad_h_n * (length == 0).unsqueeze(1)
    grad_w_hh = grad_gates_first.t().mm(hx)
    if T > 1:
        # Every other step's h_{t-1} is the output of the step before it; a row's step after its last outputs zero.
        later = grad_gates_2d[: (T - 1) * B] if reverse else grad_gates_2d[B:]
        h_prev = output.reshape(T * B, H)[B:] if reverse else output.reshape(T * B, H)[: (T - 1) * B]
        grad_w_hh = grad_w_hh.addmm(later.t(), h_prev)
    return (grad_gates_2d.mm(w_ih).view(T, B, I), grad_hx, grad_cx, grad_gates_2d.t().mm(input.reshape(T * B, I)),
            grad_w_hh, grad_gates_2d.sum(0))
