// fastseq2seq::linear, CPU: input [..., K] @ weight[N, K]^T (+ bias [N]), torch.nn.functional.linear's math. Inside
// a constant-weights scope one panel GEMM over the weight packed once for the scope (weight_panels.h): a decoder
// step's products, which MKL's sgemm would repack at every step; elsewhere at::linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "panel_gemm.h"
#include "weight_panels.h"

namespace fastseq2seq {
namespace {

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
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
  const auto panels = scoped_weight_panels(weight, PanelLayout::kLinear);
  if (!panels) return at::linear(input, weight, bias);
  const at::Tensor a = input.reshape({-1, K}).contiguous();
  const int64_t M = a.size(0);
  at::Tensor out = at::empty({M, N}, input.options());
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  panel_gemm_all(a.const_data_ptr<float>(), K, M, *panels, out.data_ptr<float>(), N, column_panel_output, N,
                 /*accumulate=*/false, b.defined() ? b.const_data_ptr<float>() : nullptr);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
  shape.push_back(N);
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastseq2seq, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastseq2seq, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace fastseq2seq
