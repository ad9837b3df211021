// LSTM layer CUDA kernels: the whole recurrence of one direction inside one op. Per step, cuBLAS adds h_{t-1} W_hh^T
// into that step's slice of the precomputed input projections, and one fused kernel does the gate math, the state
// update and the lengths masking; the backward mirrors it (the CPU version in ../lstm_layer.cpp is the same loop).
// FASTSEQ2SEQ_LSTM_RECURRENCE=persistent hands either loop to lstm_layer_persistent.cu where its size rule fits.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "cuda/lstm_gates.cuh"
#include "lstm_layer.h"
#include "lstm_layer_persistent.h"

namespace fastseq2seq {
namespace {

__device__ __forceinline__ int64_t row_length(const int64_t* lengths, int64_t b, int64_t T) {
  return lengths ? lengths[b] : T;
}

// One thread per (row, hidden unit) of step t: gates_t holds x_t W_ih^T + biases + h_{t-1} W_hh^T on entry and the
// activated gates on exit. h/c are the running state, updated in place (the GEMM that read h has finished).
template <typename scalar_t>
__global__ void lstm_layer_step_fwd_kernel(scalar_t* __restrict__ gates_t, scalar_t* __restrict__ cells_t,
                                           scalar_t* __restrict__ out_t, scalar_t* __restrict__ h,
                                           scalar_t* __restrict__ c, const int64_t* __restrict__ lengths, int64_t t,
                                           int64_t T, int64_t B, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx % H;
    scalar_t* g = gates_t + b * 4 * H;
    if (t >= row_length(lengths, b, T)) {  // past the end: zero output and saved buffers, state unchanged
      g[j] = g[H + j] = g[2 * H + j] = g[3 * H + j] = scalar_t(0);
      cells_t[idx] = out_t[idx] = scalar_t(0);
      continue;
    }
    acc_t gate[4] = {g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
    acc_t hj;
    const acc_t cj = lstm_gates_fwd(gate, static_cast<acc_t>(c[idx]), &hj);
#pragma unroll
    for (int k = 0; k < 4; ++k) g[k * H + j] = gate[k];
    cells_t[idx] = c[idx] = cj;
    out_t[idx] = h[idx] = hj;
  }
}

// The fused elementwise backward of step t. grad_h holds dgates_{t+1} W_hh (the recurrent gradient); the step that
// produced h_n takes grad_h_n / grad_c_n instead, and the step that consumed (h0, c0) writes grad_cx and keeps its
// gate gradients in grad_gates_first.
template <typename scalar_t>
__global__ void lstm_layer_step_bwd_kernel(const scalar_t* __restrict__ gates_t, const scalar_t* __restrict__ cells_t,
                                           const scalar_t* __restrict__ cells_prev, const scalar_t* __restrict__ c0,
                                           const scalar_t* __restrict__ grad_out_t,
                                           const scalar_t* __restrict__ grad_h_n,
                                           const scalar_t* __restrict__ grad_c_n, const scalar_t* __restrict__ grad_h,
                                           const scalar_t* __restrict__ grad_c, scalar_t* __restrict__ grad_c_prev,
                                           scalar_t* __restrict__ grad_cx, scalar_t* __restrict__ grad_gates_t,
                                           scalar_t* __restrict__ grad_gates_first,
                                           const int64_t* __restrict__ lengths, bool reverse, int64_t t, int64_t T,
                                           int64_t B, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx % H;
    scalar_t* dg = grad_gates_t + b * 4 * H;
    const int64_t length = row_length(lengths, b, T);
    if (t >= length) {
      dg[j] = dg[H + j] = dg[2 * H + j] = dg[3 * H + j] = scalar_t(0);
      continue;
    }
    const SequenceSteps steps = sequence_steps(length, reverse);
    const bool at_last = t == steps.last, at_first = t == steps.first;
    const scalar_t* g = gates_t + b * 4 * H;
    const acc_t gate[4] = {g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
    const acc_t c_prev = at_first ? c0[idx] : cells_prev[idx];
    const acc_t dh = static_cast<acc_t>(grad_out_t[idx]) + static_cast<acc_t>(at_last ? grad_h_n[idx] : grad_h[idx]);
    const acc_t dc = static_cast<acc_t>(at_last ? grad_c_n[idx] : grad_c[idx]);
    acc_t d_gate[4];
    const acc_t d_c_prev = lstm_gates_bwd(gate, static_cast<acc_t>(cells_t[idx]), c_prev, dh, dc, d_gate);
    const scalar_t d_i = d_gate[0], d_f = d_gate[1], d_g = d_gate[2], d_o = d_gate[3];
    dg[j] = d_i;
    dg[H + j] = d_f;
    dg[2 * H + j] = d_g;
    dg[3 * H + j] = d_o;
    if (at_first) {
      grad_cx[idx] = d_c_prev;
      scalar_t* dg_first = grad_gates_first + b * 4 * H;
      dg_first[j] = d_i;
      dg_first[H + j] = d_f;
      dg_first[2 * H + j] = d_g;
      dg_first[3 * H + j] = d_o;
    } else {
      grad_c_prev[idx] = d_c_prev;
    }
  }
}

constexpr int kThreads = 256;

// FASTSEQ2SEQ_LSTM_RECURRENCE, read at every call: auto (default) | per-step | graph | persistent. `auto` keeps the
// per-step path, the one the tests have verified: the persistent kernels have not run on a GPU yet, so they run only
// when asked. `graph` (CUDA-graph replay) is the Triton path's; here it is per-step, so that one process-wide value
// serves both backends.
bool persistent_recurrence_requested() {
  const char* value = std::getenv("FASTSEQ2SEQ_LSTM_RECURRENCE");
  const std::string mode = value ? value : "";
  if (mode.empty() || mode == "auto" || mode == "per-step" || mode == "graph") return false;
  TORCH_CHECK_VALUE(mode == "persistent",
                    "fastseq2seq: environment variable FASTSEQ2SEQ_LSTM_RECURRENCE must be auto, per-step, graph or "
                    "persistent, got '", mode, "'");
  return true;
}

// Fills gates/cells/output for every step and leaves the final state in h/c (lstm_layer_fwd_cuda's loop). The
// persistent kernel (W_hh on chip, one launch for all steps) runs when requested and its size rule fits; else the
// per-step path: cuBLAS adds h_{t-1} W_hh^T into gates[t], then the fused gate kernel, T launches of each.
void run_forward_recurrence(at::Tensor& gates, at::Tensor& cells, at::Tensor& output, at::Tensor& h, at::Tensor& c,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths, bool reverse) {
  if (persistent_recurrence_requested() &&
      lstm_layer_persistent_fwd(gates, cells, output, h, c, w_hh, lengths, reverse)) {
    return;
  }
  const int64_t T = gates.size(0), B = gates.size(1), H = h.size(1);
  const at::Tensor w_hh_t = w_hh.t();
  const int64_t* plengths = lengths ? lengths->const_data_ptr<int64_t>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_layer_fwd_cuda", [&] {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      at::Tensor gates_t = gates[t];
      at::addmm_out(gates_t, gates_t, h, w_hh_t);
      lstm_layer_step_fwd_kernel<scalar_t><<<elementwise_grid(B * H, kThreads), kThreads, 0, stream>>>(
          gates_t.data_ptr<scalar_t>(), cells[t].data_ptr<scalar_t>(), output[t].data_ptr<scalar_t>(),
          h.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), plengths, t, T, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& lengths, bool reverse) {
  check_lstm_layer_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2), H = hx.size(1);
  at::Tensor gates = at::empty({T, B, 4 * H}, input.options());
  at::Tensor cells = at::empty({T, B, H}, input.options());
  at::Tensor output = at::empty({T, B, H}, input.options());
  at::Tensor h_n = hx.contiguous().clone();
  at::Tensor c_n = cx.contiguous().clone();
  if (T * B * H == 0) return {output, h_n, c_n, gates, cells};
  at::Tensor gates_2d = gates.view({T * B, 4 * H});
  const at::Tensor input_2d = input.reshape({T * B, I});
  if (b_ih) {
    at::addmm_out(gates_2d, *b_ih + *b_hh, input_2d, w_ih.t());
  } else {
    at::mm_out(gates_2d, input_2d, w_ih.t());
  }
  const std::optional<at::Tensor> lengths_c = lengths ? std::optional<at::Tensor>(lengths->contiguous()) : std::nullopt;
  run_forward_recurrence(gates, cells, output, h_n, c_n, w_hh, lengths_c, reverse);
  return {output, h_n, c_n, gates, cells};
}

// Fills grad_gates for every step, grad_gates_first and grad_cx (lstm_layer_bwd_cuda's loop; see
// lstm_layer_persistent_bwd for the buffers' contract). The persistent kernel runs when requested and its size rule
// fits; else per step: the fused elementwise backward, then cuBLAS for dgates_t W_hh, T launches of each.
void run_backward_recurrence(const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& c0,
                             const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                             at::Tensor& grad_gates, at::Tensor& grad_gates_first, at::Tensor& grad_cx,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths, bool reverse) {
  if (persistent_recurrence_requested() &&
      lstm_layer_persistent_bwd(gates, cells, c0, grad_output, grad_h_n, grad_c_n, grad_gates, grad_gates_first,
                                grad_cx, w_hh, lengths, reverse)) {
    return;
  }
  const int64_t T = gates.size(0), B = gates.size(1), H = c0.size(1);
  at::Tensor grad_h = at::empty({B, H}, gates.options());
  at::Tensor grad_c = at::empty({B, H}, gates.options());
  at::Tensor grad_c_prev = at::empty({B, H}, gates.options());
  const int64_t* plengths = lengths ? lengths->const_data_ptr<int64_t>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_layer_bwd_cuda", [&] {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
      const int64_t t_prev = reverse ? t + 1 : t - 1;
      const scalar_t* cells_prev = (t_prev >= 0 && t_prev < T) ? cells[t_prev].const_data_ptr<scalar_t>() : nullptr;
      lstm_layer_step_bwd_kernel<scalar_t><<<elementwise_grid(B * H, kThreads), kThreads, 0, stream>>>(
          gates[t].const_data_ptr<scalar_t>(), cells[t].const_data_ptr<scalar_t>(), cells_prev,
          c0.const_data_ptr<scalar_t>(), grad_output[t].const_data_ptr<scalar_t>(),
          grad_h_n.const_data_ptr<scalar_t>(), grad_c_n.const_data_ptr<scalar_t>(), grad_h.const_data_ptr<scalar_t>(),
          grad_c.const_data_ptr<scalar_t>(), grad_c_prev.data_ptr<scalar_t>(), grad_cx.data_ptr<scalar_t>(),
          grad_gates[t].data_ptr<scalar_t>(), grad_gates_first.data_ptr<scalar_t>(), plengths, reverse, t, T, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(grad_c, grad_c_prev);
      if (s + 1 < T) at::mm_out(grad_h, grad_gates[t], w_hh);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& lengths, bool reverse, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells) {
  check_lstm_layer_bwd_args(grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, lengths, output, gates,
                            cells);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t T = input.size(0), B = input.size(1), H = hx.size(1);
  const at::Tensor go = grad_output.contiguous(), ghn = grad_h_n.contiguous(), gcn = grad_c_n.contiguous(),
                   gt = gates.contiguous(), cc = cells.contiguous(), c0 = cx.contiguous();
  at::Tensor grad_gates = at::empty({T, B, 4 * H}, input.options());
  at::Tensor grad_gates_first = at::zeros({B, 4 * H}, input.options());
  at::Tensor grad_cx = gcn.clone();  // rows of length 0 pass the gradient straight through
  if (B * H > 0) {
    const std::optional<at::Tensor> lengths_c =
        lengths ? std::optional<at::Tensor>(lengths->contiguous()) : std::nullopt;
    run_backward_recurrence(gt, cc, c0, go, ghn, gcn, grad_gates, grad_gates_first, grad_cx, w_hh, lengths_c,
                            reverse);
  } else {
    grad_gates.zero_();
  }
  return lstm_layer_grads_after_loop(grad_gates, grad_gates_first, grad_h_n, grad_cx, input, hx, w_ih, w_hh, lengths,
                                     reverse, output);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseq2seq, CUDA, m) {
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cuda);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cuda);
}

}  // namespace fastseq2seq
