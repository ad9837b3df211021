// LSTM cell: argument checks and the per-row gate math shared by the CPU cell and layer kernels.
#pragma once
#include <ATen/ATen.h>
#include <cmath>
#include <cstdint>
#include <optional>

#include "checks.h"
#include "cpu_dispatch.h"
#include "fast_math.h"

namespace fastseq2seq {

// input [B, I] (a cell) or [T, B, I] (a layer), hx/cx [B, H], w_ih [4H, I], w_hh [4H, H], biases [4H];
// all on one device, in one dtype.
inline void check_lstm_args(const at::Tensor& input, int64_t input_rank, const at::Tensor& hx, const at::Tensor& cx,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh) {
  check_rank(input, "input", input_rank);
  check_rank(hx, "hx[0]", 2);
  check_rank(cx, "hx[1]", 2);
  check_rank(w_ih, "w_ih", 2);
  check_rank(w_hh, "w_hh", 2);
  const int64_t B = input.size(-2), I = input.size(-1), H = hx.size(1);
  check_float_dtype(input, "input", input.is_cuda());
  check_shape(hx, "hx[0]", {B, H});
  check_shape(cx, "hx[1]", {B, H});
  check_shape(w_ih, "w_ih", {4 * H, I});
  check_shape(w_hh, "w_hh", {4 * H, H});
  check_like(hx, "hx[0]", input, "input");
  check_like(cx, "hx[1]", input, "input");
  check_like(w_ih, "w_ih", input, "input");
  check_like(w_hh, "w_hh", input, "input");
  FS2S_CHECK_ARG(b_ih.has_value() == b_hh.has_value(), "b_ih", "b_ih and b_hh must be given together");
  if (b_ih.has_value()) {
    check_shape(*b_ih, "b_ih", {4 * H});
    check_shape(*b_hh, "b_hh", {4 * H});
    check_like(*b_ih, "b_ih", input, "input");
    check_like(*b_hh, "b_hh", input, "input");
  }
}

inline void check_lstm_cell_args(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  check_lstm_args(input, 2, hx, cx, w_ih, w_hh, b_ih, b_hh);
}

// n hidden units of one batch row of the fused forward; gate k of unit j is gates[k * gate_stride + j] (as are the
// biases), so a row's slice of units is a row with an offset. gates holds x W_ih^T + h W_hh^T on entry and the
// activated gates (i, f, g, o) on exit: the backward needs nothing else. The bias test sits outside the loop so that
// it vectorizes.
template <typename T, bool kBias>
FS2S_ROW_INLINE void lstm_cell_fwd_row_body(T* __restrict gates, const T* __restrict b_ih, const T* __restrict b_hh,
                                            const T* __restrict c_prev, T* __restrict c, T* __restrict h, int64_t n,
                                            int64_t gate_stride) {
  const int64_t S = gate_stride;
  T* gi = gates;
  T* gf = gates + S;
  T* gg = gates + 2 * S;
  T* go = gates + 3 * S;
  for (int64_t j = 0; j < n; ++j) {
    T bi = 0, bf = 0, bg = 0, bo = 0;
    if constexpr (kBias) {
      bi = b_ih[j] + b_hh[j];
      bf = b_ih[S + j] + b_hh[S + j];
      bg = b_ih[2 * S + j] + b_hh[2 * S + j];
      bo = b_ih[3 * S + j] + b_hh[3 * S + j];
    }
    const T i = sigmoid(gi[j] + bi), f = sigmoid(gf[j] + bf), g = tanh_fast(gg[j] + bg), o = sigmoid(go[j] + bo);
    const T cj = f * c_prev[j] + i * g;
    gi[j] = i;
    gf[j] = f;
    gg[j] = g;
    go[j] = o;
    c[j] = cj;
    h[j] = o * tanh_fast(cj);
  }
}

// n hidden units of one batch row of the fused backward (gates and grad_gates laid out as in the forward):
// gradients w.r.t. the pre-activation gates and c_prev.
template <typename T>
FS2S_ROW_INLINE void lstm_cell_bwd_row_body(const T* __restrict gates, const T* __restrict c_prev,
                                            const T* __restrict c, const T* __restrict grad_h,
                                            const T* __restrict grad_c, T* __restrict grad_gates,
                                            T* __restrict grad_c_prev, int64_t n, int64_t gate_stride) {
  const int64_t S = gate_stride;
  for (int64_t j = 0; j < n; ++j) {
    const T i = gates[j], f = gates[S + j], g = gates[2 * S + j], o = gates[3 * S + j];
    const T tc = tanh_fast(c[j]);
    const T dc = grad_c[j] + grad_h[j] * o * (T(1) - tc * tc);
    grad_gates[j] = dc * g * i * (T(1) - i);
    grad_gates[S + j] = dc * c_prev[j] * f * (T(1) - f);
    grad_gates[2 * S + j] = dc * i * (T(1) - g * g);
    grad_gates[3 * S + j] = grad_h[j] * tc * o * (T(1) - o);
    grad_c_prev[j] = dc * f;
  }
}

// Builds of the row loops for each instruction set; the entry points below pick one per CPU (AVX-512: one vector of
// 16 floats per 16 units, the layer's panel width).
template <typename T, bool kBias>
void lstm_cell_fwd_row_baseline(T* gates, const T* b_ih, const T* b_hh, const T* c_prev, T* c, T* h, int64_t n,
                                int64_t gate_stride) {
  lstm_cell_fwd_row_body<T, kBias>(gates, b_ih, b_hh, c_prev, c, h, n, gate_stride);
}
template <typename T, bool kBias>
FS2S_TARGET_AVX2 void lstm_cell_fwd_row_avx2(T* gates, const T* b_ih, const T* b_hh, const T* c_prev, T* c, T* h,
                                             int64_t n, int64_t gate_stride) {
  lstm_cell_fwd_row_body<T, kBias>(gates, b_ih, b_hh, c_prev, c, h, n, gate_stride);
}
template <typename T, bool kBias>
FS2S_TARGET_AVX512 void lstm_cell_fwd_row_avx512(T* gates, const T* b_ih, const T* b_hh, const T* c_prev, T* c, T* h,
                                                 int64_t n, int64_t gate_stride) {
  lstm_cell_fwd_row_body<T, kBias>(gates, b_ih, b_hh, c_prev, c, h, n, gate_stride);
}
template <typename T>
void lstm_cell_bwd_row_baseline(const T* gates, const T* c_prev, const T* c, const T* grad_h, const T* grad_c,
                                T* grad_gates, T* grad_c_prev, int64_t n, int64_t gate_stride) {
  lstm_cell_bwd_row_body(gates, c_prev, c, grad_h, grad_c, grad_gates, grad_c_prev, n, gate_stride);
}
template <typename T>
FS2S_TARGET_AVX2 void lstm_cell_bwd_row_avx2(const T* gates, const T* c_prev, const T* c, const T* grad_h,
                                             const T* grad_c, T* grad_gates, T* grad_c_prev, int64_t n,
                                             int64_t gate_stride) {
  lstm_cell_bwd_row_body(gates, c_prev, c, grad_h, grad_c, grad_gates, grad_c_prev, n, gate_stride);
}
template <typename T>
FS2S_TARGET_AVX512 void lstm_cell_bwd_row_avx512(const T* gates, const T* c_prev, const T* c, const T* grad_h,
                                                 const T* grad_c, T* grad_gates, T* grad_c_prev, int64_t n,
                                                 int64_t gate_stride) {
  lstm_cell_bwd_row_body(gates, c_prev, c, grad_h, grad_c, grad_gates, grad_c_prev, n, gate_stride);
}

// The entry points: b_ih/b_hh null for no bias. A whole row is n = gate_stride = H.
template <typename T>
inline void lstm_cell_fwd_row(T* gates, const T* b_ih, const T* b_hh, const T* c_prev, T* c, T* h, int64_t n,
                              int64_t gate_stride) {
  const auto run = b_ih ? for_this_cpu(lstm_cell_fwd_row_avx512<T, true>, lstm_cell_fwd_row_avx2<T, true>,
                                       lstm_cell_fwd_row_baseline<T, true>)
                        : for_this_cpu(lstm_cell_fwd_row_avx512<T, false>, lstm_cell_fwd_row_avx2<T, false>,
                                       lstm_cell_fwd_row_baseline<T, false>);
  run(gates, b_ih, b_hh, c_prev, c, h, n, gate_stride);
}
template <typename T>
inline void lstm_cell_bwd_row(const T* gates, const T* c_prev, const T* c, const T* grad_h, const T* grad_c,
                              T* grad_gates, T* grad_c_prev, int64_t n, int64_t gate_stride) {
  const auto run = for_this_cpu(lstm_cell_bwd_row_avx512<T>, lstm_cell_bwd_row_avx2<T>, lstm_cell_bwd_row_baseline<T>);
  run(gates, c_prev, c, grad_h, grad_c, grad_gates, grad_c_prev, n, gate_stride);
}

}  // namespace fastseq2seq
