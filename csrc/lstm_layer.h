// LSTM layer (the whole recurrence of one direction): argument checks and the step bookkeeping shared by the
// CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <optional>

#include "checks.h"
#include "lstm_cell.h"
#include "panel_gemm.h"

namespace fastseq2seq {

// input [T, B, I], hx/cx [B, H], w_ih [4H, I], w_hh [4H, H], biases [4H], lengths int64 [B] on input's device.
inline void check_lstm_layer_args(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                  const std::optional<at::Tensor>& lengths) {
  check_lstm_args(input, 3, hx, cx, w_ih, w_hh, b_ih, b_hh);
  const int64_t T = input.size(0), B = input.size(1);
  if (lengths.has_value()) {
    check_shape(*lengths, "lengths", {B});
    FS2S_CHECK_ARG(lengths->scalar_type() == at::kLong, "lengths", "expected dtype int64, got ",
                   lengths->scalar_type());
    FS2S_CHECK_ARG(lengths->device() == input.device(), "lengths", "is on ", lengths->device(), " but 'input' is on ",
                   input.device());
    if (B > 0) {
      // One host round trip on CUDA: the values decide which steps run, so they must be checked before any runs.
      const auto [lo, hi] = at::aminmax(*lengths);
      const int64_t min_length = lo.item<int64_t>(), max_length = hi.item<int64_t>();
      FS2S_CHECK_ARG(min_length >= 0, "lengths", "must be >= 0, got ", min_length);
      FS2S_CHECK_ARG(max_length <= T, "lengths", "must be <= T = input.size(0) = ", T, ", got ", max_length);
    }
  }
}

// The backward's arguments: the forward's, the incoming gradients and what the forward saved.
inline void check_lstm_layer_bwd_args(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                      const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& hx,
                                      const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const std::optional<at::Tensor>& lengths, const at::Tensor& output,
                                      const at::Tensor& gates, const at::Tensor& cells) {
  check_lstm_layer_args(input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt, lengths);
  const int64_t T = input.size(0), B = input.size(1), H = hx.size(1);
  check_shape(grad_output, "grad_output", {T, B, H});
  check_shape(grad_h_n, "grad_h_n", {B, H});
  check_shape(grad_c_n, "grad_c_n", {B, H});
  check_shape(output, "output", {T, B, H});
  check_shape(gates, "gates", {T, B, 4 * H});
  check_shape(cells, "cells", {T, B, H});
}

// Which steps of a sequence of `length` valid steps the recurrence visits first and last: forward runs
// 0 .. length-1, reverse runs length-1 .. 0. Step t is valid iff t < length.
struct SequenceSteps {
  int64_t first, last;
};
#if defined(__CUDACC__)
__host__ __device__
#endif
inline SequenceSteps sequence_steps(int64_t length, bool reverse) {
  return reverse ? SequenceSteps{length - 1, 0} : SequenceSteps{0, length - 1};
}

// The gradients that are large GEMMs over all steps, after the backward loop has filled grad_gates [T, B, 4H] (zero
// past each row's length) and grad_gates_first [B, 4H] (each row's grad_gates at the step that consumed (h0, c0),
// zero for rows of length 0). Returns (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_grads_after_loop(
    const at::Tensor& grad_gates, const at::Tensor& grad_gates_first, const at::Tensor& grad_h_n,
    const at::Tensor& grad_cx, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths, bool reverse, const at::Tensor& output) {
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2), H = hx.size(1);
  const at::Tensor grad_gates_2d = grad_gates.view({T * B, 4 * H});
  at::Tensor grad_hx = at::mm(grad_gates_first, w_hh);
  // A row of length 0 (every row when T = 0) ends in its initial state.
  if (lengths) {
    grad_hx.add_(grad_h_n * lengths->eq(0).unsqueeze(1).to(grad_h_n.scalar_type()));
  } else if (T == 0) {
    grad_hx.add_(grad_h_n);
  }
  // The large products as a^T @ b (transposed_product: the panel kernel on the CPU, at::mm elsewhere).
  at::Tensor grad_w_hh = transposed_product(grad_gates_first, hx);
  if (T > 1) {
    // Every other step's h_{t-1} is the output of the step before it; a row's step after its last outputs zero.
    const at::Tensor later = grad_gates_2d.narrow(0, reverse ? 0 : B, (T - 1) * B);
    const at::Tensor h_prev = output.reshape({T * B, H}).narrow(0, reverse ? B : 0, (T - 1) * B);
    transposed_product_out(later, h_prev, grad_w_hh, /*accumulate=*/true);
  }
  return {transposed_product(grad_gates_2d.t(), w_ih).view({T, B, I}), grad_hx, grad_cx,
          transposed_product(grad_gates_2d, input.reshape({T * B, I})), grad_w_hh, grad_gates_2d.sum(0)};
}

}  // namespace fastseq2seq
