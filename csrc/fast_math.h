// Branch-free float math that GCC vectorizes in row loops; the double overloads stay exact for gradcheck.
#pragma once
#include <cmath>
#include <cstdint>

namespace fastseq2seq {

// Branch-free so that GCC vectorizes the row loops calling it; within 2 ulp of expf over the clamped range.
inline float exp_approx(float x) {
  x = std::fmin(std::fmax(x, -87.0f), 88.0f);
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
inline double exp_approx(double x) { return std::exp(x); }  // fp64 serves gradcheck: keep it exact

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + exp_approx(-x)); }
template <typename T>
inline T tanh_fast(T x) { return T(2) * sigmoid(T(2) * x) - T(1); }

}  // namespace fastseq2seq
