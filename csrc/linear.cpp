// fastseq2seq::linear, CPU: input [..., K] @ weight[N, K]^T (+ bias [N]), torch.nn.functional.linear's math, and its
// backward. Inside a constant-weights scope one panel GEMM over the weight packed once for the scope
// (weight_panels.h): a decoder step's products, which MKL's sgemm would repack at every step; elsewhere at::linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu_dispatch.h"
#include "panel_gemm.h"
#include "weight_panels.h"
#ifdef FS2S_X86
#include <immintrin.h>
#endif

namespace fastseq2seq {
namespace {

void check_linear_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  FS2S_CHECK_ARG(input.dim() >= 1, "input", "expected at least one dimension, got a 0-D tensor");
  check_rank(weight, "weight", 2);
  const int64_t N = weight.size(0), K = weight.size(1);
  FS2S_CHECK_ARG(input.size(-1) == K, "input", "last dimension ", input.size(-1), " does not match weight's ", K,
                 " columns (weight shape ", weight.sizes(), ")");
  check_like(weight, "weight", input, "input");
  if (bias) {
    check_shape(*bias, "bias", {N});
    check_like(*bias, "bias", input, "input");
  }
}

// [M, N] logits over the weight's panels packed for the scope, or nullopt where there are none.
std::optional<at::Tensor> panel_linear(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias) {
  const auto panels = scoped_weight_panels(weight, PanelLayout::kLinear);
  if (!panels) return std::nullopt;
  const int64_t N = weight.size(0), K = weight.size(1);
  const at::Tensor a = input.reshape({-1, K}).contiguous();
  const int64_t M = a.size(0);
  at::Tensor out = at::empty({M, N}, input.options());
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  panel_gemm_all(a.const_data_ptr<float>(), K, M, *panels, out.data_ptr<float>(), N, column_panel_output, N,
                 /*accumulate=*/false, b.defined() ? b.const_data_ptr<float>() : nullptr);
  return out;
}

std::vector<int64_t> leading_shape(const at::Tensor& input) {
  return std::vector<int64_t>(input.sizes().begin(), input.sizes().end() - 1);
}

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_args(input, weight, bias);
  const auto out = panel_linear(input, weight, bias);
  if (!out) return at::linear(input, weight, bias);
  auto shape = leading_shape(input);
  shape.push_back(weight.size(0));
  return out->view(shape);
}

#ifdef FS2S_X86
// torch.argmax of one row: the first index of its maximum, NaN counting as the maximum (the first NaN wins). Two
// passes over the row, which stays in cache: the maximum (and whether a NaN is present), then its first index.
FS2S_TARGET_AVX512 int64_t row_argmax_avx512(const float* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  float top = _mm512_reduce_max_ps(best);
  for (int64_t k = j; k < n; ++k) {
    if (std::isnan(x[k])) nan = 1;
    top = std::max(top, x[k]);
  }
  const bool find_nan = nan != 0;
  const __m512 target = _mm512_set1_ps(top);
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __mmask16 hit =
        find_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  for (; j < n; ++j)
    if (find_nan ? std::isnan(x[j]) : x[j] == top) return j;
  return 0;
}
#endif

at::Tensor linear_argmax_cpu(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  check_linear_args(input, weight, bias);
  FS2S_CHECK_ARG(weight.size(0) > 0, "weight", "has no rows: argmax over zero outputs");
  const auto logits = panel_linear(input, weight, bias);
  if (!logits) return at::linear(input, weight, bias).argmax(-1);
#ifdef FS2S_X86
  // panel_linear gives logits only where AVX-512 is (panel_gemm_supported); aten's argmax is not vectorized.
  const int64_t M = logits->size(0), N = logits->size(1);
  at::Tensor index = at::empty({M}, input.options().dtype(at::kLong));
  const float* pl = logits->const_data_ptr<float>();
  int64_t* pi = index.data_ptr<int64_t>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) pi[r] = row_argmax_avx512(pl + r * N, N);
  });
  return index.view(leading_shape(input));
#else
  return logits->argmax(-1).view(leading_shape(input));
#endif
}

// Returns (grad_input, grad_weight, grad_bias); grad_bias is empty without a bias. On AVX-512 in fp32: grad_input
// over the weight's panels packed once per constant-weights scope, grad_weight as grad^T @ x on panels of x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                              const at::Tensor& weight, bool has_bias) {
  check_linear_args(input, weight, std::nullopt);
  const int64_t N = weight.size(0), K = weight.size(1);
  auto output_shape = leading_shape(input);
  output_shape.push_back(N);
  check_shape(grad_output, "grad_output", output_shape);
  check_like(grad_output, "grad_output", input, "input");
  const at::Tensor g = grad_output.reshape({-1, N}).contiguous(), x = input.reshape({-1, K}).contiguous();
  const at::Tensor grad_input = times_weight(g, weight), grad_weight = transposed_product(g, x);
  return {grad_input.view(input.sizes()), grad_weight, has_bias ? g.sum(0) : at::empty({0}, input.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastseq2seq, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_bwd(Tensor grad_output, Tensor input, Tensor weight, bool has_bias) -> (Tensor, Tensor, Tensor)");
  // argmax(linear(input, weight, bias), -1) without returning the logits: a greedy decoder's output layer.
  m.def("linear_argmax(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastseq2seq, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_bwd", &linear_bwd_cpu);
  m.impl("linear_argmax", &linear_argmax_cpu);
}

}  // namespace fastseq2seq
