// Branch-free float math that GCC vectorizes in row loops (always inlined: an out-of-line copy would keep a loop
// of another target from vectorizing); the double overloads stay exact for gradcheck.
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu_dispatch.h"

namespace fastseq2seq {

// exp(x) without a range check: 2^n times a polynomial in the remainder. x must lie in [-87, 88].
FS2S_ROW_INLINE float exp_in_range(float x) {
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest, vectorizably
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  __builtin_memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  __builtin_memcpy(&p, &bits, 4);
  return p;
}

// `mask` all ones: if_set, zero: otherwise. GCC vectorizes this where it vectorizes no float select or min/max.
FS2S_ROW_INLINE float select_bits(int32_t mask, float if_set, float otherwise) {
  int32_t set_bits, otherwise_bits;
  __builtin_memcpy(&set_bits, &if_set, 4);
  __builtin_memcpy(&otherwise_bits, &otherwise, 4);
  set_bits = (set_bits & mask) | (otherwise_bits & ~mask);
  float result;
  __builtin_memcpy(&result, &set_bits, 4);
  return result;
}

// Branch-free; within 2 ulp of expf over the clamped range. The clamp is fmin(fmax(x, -87), 88), NaN and all,
// written with select_bits so that the LSTM gate loops vectorize (std::fmin/fmax keep GCC from it).
FS2S_ROW_INLINE float exp_approx(float x) {
  x = select_bits(-static_cast<int32_t>(!(x >= -87.0f)), -87.0f, x);
  return exp_in_range(select_bits(-static_cast<int32_t>(x > 88.0f), 88.0f, x));
}
inline double exp_approx(double x) { return std::exp(x); }  // fp64 serves gradcheck: keep it exact

template <typename T>
FS2S_ROW_INLINE T sigmoid(T x) { return T(1) / (T(1) + exp_approx(-x)); }
template <typename T>
FS2S_ROW_INLINE T tanh_fast(T x) { return T(2) * sigmoid(T(2) * x) - T(1); }

// exp(x) for x <= 0 (a softmax's shifted scores). Without -ffast-math GCC vectorizes no float min or max
// (exp_approx's clamp) nor a float select, so this one clamps by selecting bits with an integer mask.
FS2S_ROW_INLINE float exp_nonpositive(float x) {
  const int32_t underflows = -static_cast<int32_t>(x < -87.0f);  // all ones or zero
  const float lowest = -87.0f;
  int32_t x_bits, lowest_bits;
  __builtin_memcpy(&x_bits, &x, 4);
  __builtin_memcpy(&lowest_bits, &lowest, 4);
  x_bits = (x_bits & ~underflows) | (lowest_bits & underflows);
  __builtin_memcpy(&x, &x_bits, 4);
  return exp_in_range(x);
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// tanh of finite x from exp_nonpositive(-2|x|): vectorizes, unlike tanh_fast.
FS2S_ROW_INLINE float tanh_vectorizable(float x) {
  const float e = exp_nonpositive(-2.0f * std::fabs(x));
  return std::copysign((1.0f - e) / (1.0f + e), x);
}
inline double tanh_vectorizable(double x) { return std::tanh(x); }

// sum over i < n of term(i), in independent partial sums: one running sum would wait on each add's latency.
template <typename T, typename Term>
FS2S_ROW_INLINE T sum_of(int64_t n, Term term) {
  constexpr int64_t kPartials = 32;
  T partial[kPartials] = {};
  int64_t i = 0;
  for (; i + kPartials <= n; i += kPartials)
#pragma omp simd
    for (int64_t j = 0; j < kPartials; ++j) partial[j] += term(i + j);
  T sum = 0;
  for (; i < n; ++i) sum += term(i);
  for (int64_t j = 0; j < kPartials; ++j) sum += partial[j];
  return sum;
}

}  // namespace fastseq2seq
