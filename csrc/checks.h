// Argument checks shared by every op: each error names the argument it is about.
#pragma once
#include <ATen/ATen.h>

#define FS2S_CHECK_ARG(cond, arg, ...) TORCH_CHECK_VALUE(cond, "fastseq2seq: argument '", arg, "': ", __VA_ARGS__)

namespace fastseq2seq {

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank) {
  FS2S_CHECK_ARG(t.dim() == rank, name, "expected a ", rank, "-D tensor, got ", t.dim(), "-D with shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  FS2S_CHECK_ARG(t.sizes() == shape, name, "expected shape ", shape, ", got ", t.sizes());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  FS2S_CHECK_ARG(t.device() == ref.device(), name, "is on ", t.device(), " but '", ref_name, "' is on ", ref.device());
  FS2S_CHECK_ARG(t.scalar_type() == ref.scalar_type(), name, "has dtype ", t.scalar_type(), " but '", ref_name,
                 "' has ", ref.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* name, bool on_cuda) {
  auto dt = t.scalar_type();
  bool ok = on_cuda ? (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble)
                    : (dt == at::kFloat || dt == at::kDouble);
  FS2S_CHECK_ARG(ok, name, "dtype ", dt, " is not supported by the ",
                 on_cuda ? "cuda backend on cuda" : "cpu backend on cpu",
                 on_cuda ? " (float32, float64, float16, bfloat16)" : " (float32, float64)");
}

}  // namespace fastseq2seq
