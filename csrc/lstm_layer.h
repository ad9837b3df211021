// LSTM layer (the whole recurrence of one direction): argument checks and the step bookkeeping shared by the
// CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <optional>

#include "checks.h"

namespace fastseq2seq {

// input [T, B, I], hx/cx [B, H], w_ih [4H, I], w_hh [4H, H], biases [4H], lengths int64 [B] on input's device.
inline void check_lstm_layer_args(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                  const std::optional<at::Tensor>& lengths) {
  check_rank(input, "input", 3);
  check_rank(hx, "hx[0]", 2);
  check_rank(cx, "hx[1]", 2);
  check_rank(w_ih, "w_ih", 2);
  check_rank(w_hh, "w_hh", 2);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2), H = hx.size(1);
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

}  // namespace fastseq2seq
