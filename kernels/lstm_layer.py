"""LSTM layer in Triton: one GEMM (torch) for the input projections of all steps, then the recurrence.

Forward, three ways to run the recurrence, chosen by FASTSEQ2SEQ_LSTM_RECURRENCE (`recurrence`):
- per-step: `_lstm_layer_step_fwd_kernel` once per step, from a Python loop; it fuses h_{t-1} W_hh^T (tl.dot over
  tiles of W_hh) with the gate math, the state update and the lengths masking;
- graph: the same T launches captured once per shape in a CUDA graph (`_step_graph`) and replayed;
- persistent: for H <= LOOP_MAX_H, `_lstm_layer_loop_fwd_kernel`, one program per block of batch rows looping over
  all steps with W_hh held on chip.
Backward: per step `_lstm_layer_step_bwd_kernel` (the fused elementwise backward) and one torch.mm for the recurrent
gradient dgates_t W_hh; the weight and input gradients are GEMMs after the loop.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from fastseq2seq.kernels.lstm_cell import _accumulator, _sigmoid, _tanh

# tl.dot needs every block dimension >= 16 (also under the interpreter).
BLOCK_B = 16
BLOCK_H = 32
BLOCK_K = 32
# The program loop holds the four [H, H] gate blocks of W_hh^T for its whole run: H up to 64 (16K elements).
LOOP_MAX_H = 64
# CUDA graphs kept by the graph path (least recently used dropped): each holds its own buffers of ~6 T B H elements.
GRAPH_CACHE_SIZE = 8
RECURRENCE_ENV = "FASTSEQ2SEQ_LSTM_RECURRENCE"
RECURRENCES = ("auto", "per-step", "graph", "persistent")


@triton.jit
def _gates_and_state(pre_i, pre_f, pre_g, pre_o, g_tile, c_prev, H, mask, ACC: tl.constexpr):
    """One step's gate math: the recurrent products plus the input projections at g_tile (gate q at + q*H),
    activated; returns (i, f, g, o, c, h) in ACC."""
    i = _sigmoid(pre_i + tl.load(g_tile, mask=mask, other=0.0).to(ACC))
    f = _sigmoid(pre_f + tl.load(g_tile + H, mask=mask, other=0.0).to(ACC))
    g = _tanh(pre_g + tl.load(g_tile + 2 * H, mask=mask, other=0.0).to(ACC))
    o = _sigmoid(pre_o + tl.load(g_tile + 3 * H, mask=mask, other=0.0).to(ACC))
    c = f * c_prev + i * g
    return i, f, g, o, c, o * _tanh(c)


@triton.jit
def _store_step(g_tile, cells_tile, out_tile, i, f, g, o, c, h, valid, H, mask):
    """The activated gates over the projections at g_tile, c and h; zero where not `valid` (past a row's length)."""
    out_ty = g_tile.dtype.element_ty
    tl.store(g_tile, tl.where(valid, i, 0.0).to(out_ty), mask=mask)
    tl.store(g_tile + H, tl.where(valid, f, 0.0).to(out_ty), mask=mask)
    tl.store(g_tile + 2 * H, tl.where(valid, g, 0.0).to(out_ty), mask=mask)
    tl.store(g_tile + 3 * H, tl.where(valid, o, 0.0).to(out_ty), mask=mask)
    tl.store(cells_tile, tl.where(valid, c, 0.0).to(out_ty), mask=mask)
    tl.store(out_tile, tl.where(valid, h, 0.0).to(out_ty), mask=mask)


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
    state = rows64[:, None] * H + cols[None, :]
    c_prev = tl.load(c_ptr + state, mask=mask, other=0.0).to(ACC)
    h_prev = tl.load(h_prev_ptr + state, mask=mask, other=0.0)
    i, f, g, o, c, h = _gates_and_state(pre_i, pre_f, pre_g, pre_o, g_tile, c_prev, H, mask, ACC)
    if HAS_LENGTHS:
        valid = (t < tl.load(lengths_ptr + rows, mask=row_mask, other=0))[:, None]
    else:
        valid = row_mask[:, None]
    _store_step(g_tile, cells_ptr + state, out_ptr + state, i, f, g, o, c, h, valid, H, mask)
    # Past a row's length the state is carried over unchanged.
    out_ty = gates_ptr.dtype.element_ty
    tl.store(c_ptr + state, tl.where(valid, c, c_prev).to(out_ty), mask=mask)
    tl.store(h_next_ptr + state, tl.where(valid, h.to(out_ty), h_prev), mask=mask)


@triton.jit
def _lstm_layer_loop_fwd_kernel(gates_ptr, cells_ptr, out_ptr, h_ptr, c_ptr, w_hh_ptr, lengths_ptr, T, B, H,
                                stride_w_row, stride_w_col, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                                ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                                BLOCK_H: tl.constexpr):
    # One program per block of BLOCK_B batch rows, owning all H hidden units, runs every step of those rows: W_hh^T
    # (one [BLOCK_H, BLOCK_H] block per gate) is loaded once, h and c stay in registers (c in ACC precision), and
    # no program reads what another writes, so no barrier is needed. h_ptr / c_ptr hold h0 / c0 on entry and the
    # final state on exit; gates holds x_t W_ih^T + biases on entry and the activated gates on exit.
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < B
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    # W_hh^T block of gate q: [k, j] = W_hh[q*H + j, k]
    w_tile = w_hh_ptr + cols[:, None] * stride_w_col + cols[None, :] * stride_w_row
    w_mask = col_mask[:, None] & col_mask[None, :]
    w_i = tl.load(w_tile, mask=w_mask, other=0.0)
    w_f = tl.load(w_tile + H * stride_w_row, mask=w_mask, other=0.0)
    w_g = tl.load(w_tile + 2 * H * stride_w_row, mask=w_mask, other=0.0)
    w_o = tl.load(w_tile + 3 * H * stride_w_row, mask=w_mask, other=0.0)
    state = rows64[:, None] * H + cols[None, :]
    h = tl.load(h_ptr + state, mask=mask, other=0.0)
    c = tl.load(c_ptr + state, mask=mask, other=0.0).to(ACC)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_mask, other=0)
    else:
        length = tl.zeros((BLOCK_B,), dtype=tl.int64) + T
    out_ty = gates_ptr.dtype.element_ty
    for s in range(T):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        step = rows64[:, None] + t.to(tl.int64) * B  # row of step t in [T * B]
        g_tile = gates_ptr + step * 4 * H + cols[None, :]
        i, f, g, o, c_new, h_new = _gates_and_state(
            tl.dot(h, w_i, input_precision=DOT_PRECISION, out_dtype=ACC),
            tl.dot(h, w_f, input_precision=DOT_PRECISION, out_dtype=ACC),
            tl.dot(h, w_g, input_precision=DOT_PRECISION, out_dtype=ACC),
            tl.dot(h, w_o, input_precision=DOT_PRECISION, out_dtype=ACC), g_tile, c, H, mask, ACC)
        valid = (t < length)[:, None]
        _store_step(g_tile, cells_ptr + step * H + cols[None, :], out_ptr + step * H + cols[None, :], i, f, g, o,
                    c_new, h_new, valid, H, mask)
        # Past a row's length the state is carried over unchanged.
        c = tl.where(valid, c_new, c)
        h = tl.where(valid, h_new.to(out_ty), h)
    tl.store(h_ptr + state, h, mask=mask)
    tl.store(c_ptr + state, c.to(out_ty), mask=mask)


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


def recurrence():
    """FASTSEQ2SEQ_LSTM_RECURRENCE, read at every call: auto (default) | per-step | graph | persistent. `auto` keeps
    the per-step path, the one the tests have verified: graph and persistent have not run on a GPU yet."""
    mode = os.environ.get(RECURRENCE_ENV) or "auto"
    if mode not in RECURRENCES:
        raise ValueError(f"fastseq2seq: environment variable {RECURRENCE_ENV} must be one of {', '.join(RECURRENCES)} "
                         f"for the triton backend, got {mode!r}")
    return "per-step" if mode == "auto" else mode


def program_loop_fits(H):
    """The size rule of the program loop: the four W_hh^T gate blocks of a padded H stay on chip."""
    return H <= LOOP_MAX_H


def lstm_layer_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """(output, h_n, c_n, gates, cells) over all T steps; gates/cells are the activated gates and cell states."""
    T, B, _ = input.shape
    H = hx.shape[1]
    mode = recurrence()
    # Inside a capture (the caller's own CUDA graph) the per-step launches are captured as they are.
    if mode == "graph" and input.is_cuda and T * B * H and not torch.cuda.is_current_stream_capturing():
        return _step_graph(T, B, H, input.dtype, input.device, lengths is not None, bool(reverse),
                           _dot_precision(input.dtype)).run(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths)
    gates = input.new_empty(T, B, 4 * H)
    cells = input.new_empty(T, B, H)
    output = input.new_empty(T, B, H)
    h = hx.contiguous().clone()
    c = cx.contiguous().clone()
    if T * B * H == 0:
        return output, h, c, gates, cells
    _project(input, w_ih, b_ih, b_hh, gates)
    if mode == "persistent" and program_loop_fits(H):
        block_h = max(16, triton.next_power_of_2(H))
        _lstm_layer_loop_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            gates, cells, output, h, c, w_hh, lengths if lengths is not None else h, T, B, H, w_hh.stride(0),
            w_hh.stride(1), REVERSE=bool(reverse), HAS_LENGTHS=lengths is not None, ACC=_accumulator(input.dtype),
            DOT_PRECISION=_dot_precision(input.dtype), BLOCK_B=BLOCK_B, BLOCK_H=block_h,
            num_warps=8 if block_h > 32 else 4)
    else:
        h = _run_steps(gates, cells, output, h, torch.empty_like(h), c, w_hh, lengths, reverse)
    return output, h, c, gates, cells


def _project(input, w_ih, b_ih, b_hh, gates):
    """gates [T, B, 4H] = the input projections of all steps (and the biases), one GEMM."""
    T, B, I = input.shape
    projection = gates.view(T * B, gates.shape[2])
    if b_ih is not None:
        torch.addmm(b_ih + b_hh, input.reshape(T * B, I), w_ih.t(), out=projection)
    else:
        torch.mm(input.reshape(T * B, I), w_ih.t(), out=projection)


def _run_steps(gates, cells, output, h, h_next, c, w_hh, lengths, reverse):
    """The per-step path: one step kernel per step, h double-buffered in (h, h_next); returns the one holding h_n."""
    T, B, _ = gates.shape
    H = h.shape[1]
    for s in range(T):
        t = T - 1 - s if reverse else s
        _lstm_layer_step_fwd_kernel[_grid(B, H)](
            gates[t], cells[t], output[t], h, h_next, c, w_hh, lengths if lengths is not None else h, t, B, H,
            w_hh.stride(0), w_hh.stride(1), HAS_LENGTHS=lengths is not None, ACC=_accumulator(gates.dtype),
            DOT_PRECISION=_dot_precision(gates.dtype), BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
        h, h_next = h_next, h
    return h


class _StepGraph:
    """The per-step path of one (shape, dtype, device, lengths given, reverse, dot precision), captured once in a
    CUDA graph over buffers of its own: each call writes its inputs into them, replays, and returns copies."""

    def __init__(self, T, B, H, dtype, device, has_lengths, reverse):
        def new(*shape):
            return torch.empty(*shape, dtype=dtype, device=device)

        self.gates, self.cells, self.output = new(T, B, 4 * H), new(T, B, H), new(T, B, H)
        self.h, self.h_next, self.c, self.w_hh = new(B, H), new(B, H), new(B, H), new(4 * H, H)
        self.lengths = torch.empty(B, dtype=torch.int64, device=device) if has_lengths else None
        self.reverse = reverse
        self.graph = None
        self.h_n = None

    def run(self, input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths):
        _project(input, w_ih, b_ih, b_hh, self.gates)
        self.h.copy_(hx)
        self.c.copy_(cx)
        self.w_hh.copy_(w_hh)
        if lengths is not None:
            self.lengths.copy_(lengths)
        if self.graph is None:
            # First call: run eagerly (compiles the kernel: nothing may compile inside a capture), keep the results,
            # then capture the same launches for the calls to come.
            h_n = self._launch()
            results = self._results(h_n)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.h_n = self._launch()
            self.graph = graph
            return results
        self.graph.replay()
        return self._results(self.h_n)

    def _launch(self):
        return _run_steps(self.gates, self.cells, self.output, self.h, self.h_next, self.c, self.w_hh, self.lengths,
                          self.reverse)

    def _results(self, h_n):
        return self.output.clone(), h_n.clone(), self.c.clone(), self.gates.clone(), self.cells.clone()


@functools.lru_cache(maxsize=GRAPH_CACHE_SIZE)
def _step_graph(T, B, H, dtype, device, has_lengths, reverse, dot_precision):
    """One captured graph per key; dot_precision is in the key because the capture fixes it."""
    return _StepGraph(T, B, H, dtype, device, has_lengths, reverse)


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
