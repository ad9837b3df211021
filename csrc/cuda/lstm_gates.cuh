// The LSTM gate math of one (row, hidden unit) on the GPU, shared by the cell and the layer kernels, in the
// accumulation type (float for half/bfloat16/float, double for double).
#pragma once
#include <algorithm>
#include <cstdint>

namespace fastseq2seq {

template <typename T>
__device__ __forceinline__ T sigmoid_dev(T x) { return T(1) / (T(1) + exp(-x)); }

// gate[0..3] hold the pre-activations (i, f, g, o) on entry and the activations on exit; returns the new c,
// and h through h_out.
template <typename acc_t>
__device__ __forceinline__ acc_t lstm_gates_fwd(acc_t gate[4], acc_t c_prev, acc_t* h_out) {
  gate[0] = sigmoid_dev(gate[0]);
  gate[1] = sigmoid_dev(gate[1]);
  gate[2] = tanh(gate[2]);
  gate[3] = sigmoid_dev(gate[3]);
  const acc_t c = gate[1] * c_prev + gate[0] * gate[2];
  *h_out = gate[3] * tanh(c);
  return c;
}

// From the activated gates, c, c_prev and the gradients reaching h and c: the gradients of the four
// pre-activations (into d_gate) and returns the gradient of c_prev.
template <typename acc_t>
__device__ __forceinline__ acc_t lstm_gates_bwd(const acc_t gate[4], acc_t c, acc_t c_prev, acc_t dh, acc_t dc_in,
                                                acc_t d_gate[4]) {
  const acc_t i = gate[0], f = gate[1], g = gate[2], o = gate[3];
  const acc_t tc = tanh(c);
  const acc_t dc = dc_in + dh * o * (acc_t(1) - tc * tc);
  d_gate[0] = dc * g * i * (acc_t(1) - i);
  d_gate[1] = dc * c_prev * f * (acc_t(1) - f);
  d_gate[2] = dc * i * (acc_t(1) - g * g);
  d_gate[3] = dh * tc * o * (acc_t(1) - o);
  return dc * f;
}

inline dim3 elementwise_grid(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return dim3(static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535)));
}

}  // namespace fastseq2seq
