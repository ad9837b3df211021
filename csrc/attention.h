// Attention: argument checks shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include "checks.h"

namespace fastseq2seq {

// The softmax statistics (log-sum-exp per query row) are float32, or float64 for float64 inputs.
inline at::ScalarType attention_stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// query [B, T, D], keys [B, S, D], values [B, S, Dv], mask bool [B, S] (true = real position), v [D]
// (given: additive scores, absent: dot scores); one device and dtype.
inline void check_attention_args(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& v) {
  check_rank(query, "query", 3);
  check_rank(keys, "keys", 3);
  check_rank(values, "values", 3);
  check_float_dtype(query, "query", query.is_cuda());
  const int64_t B = query.size(0), D = query.size(2), S = keys.size(1);
  check_shape(keys, "keys", {B, S, D});
  check_shape(values, "values", {B, S, values.size(2)});
  check_like(keys, "keys", query, "query");
  check_like(values, "values", query, "query");
  if (mask.has_value()) {
    check_shape(*mask, "mask", {B, S});
    FS2S_CHECK_ARG(mask->scalar_type() == at::kBool, "mask", "expected a bool tensor, got ", mask->scalar_type());
    FS2S_CHECK_ARG(mask->device() == query.device(), "mask", "is on ", mask->device(), " but 'query' is on ",
                   query.device());
  }
  if (v.has_value()) {
    check_shape(*v, "v", {D});
    check_like(*v, "v", query, "query");
  }
}

// The backward's extra inputs: the upstream gradients and the forward's softmax statistics.
inline void check_attention_bwd_args(const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights,
                                     const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                     const at::Tensor& lse) {
  const int64_t B = query.size(0), T = query.size(1), S = keys.size(1), Dv = values.size(2);
  check_shape(grad_context, "grad_context", {B, T, Dv});
  check_like(grad_context, "grad_context", query, "query");
  if (grad_weights.has_value()) {
    check_shape(*grad_weights, "grad_weights", {B, T, S});
    check_like(*grad_weights, "grad_weights", query, "query");
  }
  check_shape(lse, "lse", {B, T});
  FS2S_CHECK_ARG(lse.scalar_type() == attention_stats_dtype(query.scalar_type()), "lse", "expected dtype ",
                 attention_stats_dtype(query.scalar_type()), ", got ", lse.scalar_type());
}

}  // namespace fastseq2seq
