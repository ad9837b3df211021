// LSTM cell CUDA kernels: cuBLAS for the two matrix products, one fused kernel for all the gate math each way.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/lstm_gates.cuh"
#include "lstm_cell.h"

namespace fastseq2seq {
namespace {

// One thread per (row, hidden unit): reads the 4 pre-activations, writes the 4 activations, c and h.
template <typename scalar_t>
__global__ void lstm_cell_fwd_kernel(scalar_t* __restrict__ gates, const scalar_t* __restrict__ b_ih,
                                     const scalar_t* __restrict__ b_hh, const scalar_t* __restrict__ cx,
                                     scalar_t* __restrict__ c, scalar_t* __restrict__ h, int64_t B, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx % H;
    scalar_t* g = gates + b * 4 * H;
    acc_t gate[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      gate[k] = static_cast<acc_t>(g[k * H + j]);
      if (b_ih) gate[k] += static_cast<acc_t>(b_ih[k * H + j]) + static_cast<acc_t>(b_hh[k * H + j]);
    }
    acc_t hj;
    c[idx] = lstm_gates_fwd(gate, static_cast<acc_t>(cx[idx]), &hj);
    h[idx] = hj;
#pragma unroll
    for (int k = 0; k < 4; ++k) g[k * H + j] = gate[k];
  }
}

template <typename scalar_t>
__global__ void lstm_cell_bwd_kernel(const scalar_t* __restrict__ gates, const scalar_t* __restrict__ cx,
                                     const scalar_t* __restrict__ c, const scalar_t* __restrict__ grad_h,
                                     const scalar_t* __restrict__ grad_c, scalar_t* __restrict__ grad_gates,
                                     scalar_t* __restrict__ grad_cx, int64_t B, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx % H;
    const scalar_t* g = gates + b * 4 * H;
    scalar_t* dg = grad_gates + b * 4 * H;
    const acc_t gate[4] = {g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
    acc_t d_gate[4];
    grad_cx[idx] = lstm_gates_bwd(gate, static_cast<acc_t>(c[idx]), static_cast<acc_t>(cx[idx]),
                                  static_cast<acc_t>(grad_h[idx]), static_cast<acc_t>(grad_c[idx]), d_gate);
#pragma unroll
    for (int k = 0; k < 4; ++k) dg[k * H + j] = d_gate[k];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  check_lstm_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), H = hx.size(1);
  at::Tensor gates = at::mm(input, w_ih.t());
  gates.addmm_(hx, w_hh.t());
  at::Tensor c = at::empty({B, H}, input.options());
  at::Tensor h = at::empty({B, H}, input.options());
  if (B * H == 0) return {h, c, gates};
  const at::Tensor cxc = cx.contiguous();
  const at::Tensor bi = b_ih ? b_ih->contiguous() : at::Tensor(), bh = b_hh ? b_hh->contiguous() : at::Tensor();
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_cell_fwd_cuda", [&] {
    lstm_cell_fwd_kernel<scalar_t><<<elementwise_grid(B * H, threads), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        gates.data_ptr<scalar_t>(), bi.defined() ? bi.const_data_ptr<scalar_t>() : nullptr,
        bh.defined() ? bh.const_data_ptr<scalar_t>() : nullptr, cxc.const_data_ptr<scalar_t>(),
        c.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), B, H);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {h, c, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd_cuda(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& gates,
    const at::Tensor& c) {
  check_lstm_cell_args(input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), H = hx.size(1);
  check_shape(grad_h, "grad_h", {B, H});
  check_shape(grad_c, "grad_c", {B, H});
  check_shape(gates, "gates", {B, 4 * H});
  check_shape(c, "c", {B, H});
  at::Tensor grad_gates = at::empty({B, 4 * H}, input.options());
  at::Tensor grad_cx = at::empty({B, H}, input.options());
  if (B * H > 0) {
    const at::Tensor gh = grad_h.contiguous(), gc = grad_c.contiguous(), gt = gates.contiguous(),
                     cc = c.contiguous(), cxc = cx.contiguous();
    constexpr int threads = 256;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_cell_bwd_cuda", [&] {
      lstm_cell_bwd_kernel<scalar_t><<<elementwise_grid(B * H, threads), threads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(
          gt.const_data_ptr<scalar_t>(), cxc.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(),
          gh.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), grad_gates.data_ptr<scalar_t>(),
          grad_cx.data_ptr<scalar_t>(), B, H);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_gates.mm(w_ih), grad_gates.mm(w_hh), grad_cx, grad_gates.t().mm(input), grad_gates.t().mm(hx),
          grad_gates.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseq2seq, CUDA, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cuda);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cuda);
}

}  // namespace fastseq2seq
