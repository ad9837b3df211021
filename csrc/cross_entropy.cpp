// Cross-entropy op schemas and the CPU kernels: per row of logits, the label-smoothed loss against a target id (0 for
// the ignored id) and its gradient, torch.nn.functional.cross_entropy(..., reduction="none")'s math. A translation
// model's output layer gives [B*T, V] logits with V in the thousands: the forward reads each row once from memory (its
// passes run in cache) and the backward reads it and writes its gradient once, where torch's log_softmax, nll, the
// smoothing term and their backwards each pass over the whole [B*T, V].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "cpu_dispatch.h"
#include "fast_math.h"

namespace fastseq2seq {
namespace {

// The largest element of a row, NaN skipped (a NaN row is caught through its sum). For float the comparison is a bit
// select, which GCC vectorizes where it vectorizes no float max.
FS2S_ROW_INLINE float row_max(const float* x, int64_t n) {
  constexpr int64_t kPartials = 32;
  float partial[kPartials];
  std::fill(partial, partial + kPartials, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kPartials <= n; i += kPartials)
#pragma omp simd
    for (int64_t j = 0; j < kPartials; ++j)
      partial[j] = select_bits(-static_cast<int32_t>(x[i + j] > partial[j]), x[i + j], partial[j]);
  float top = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) top = x[i] > top ? x[i] : top;
  for (int64_t j = 0; j < kPartials; ++j) top = partial[j] > top ? partial[j] : top;
  return top;
}
FS2S_ROW_INLINE double row_max(const double* x, int64_t n) {
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) top = x[i] > top ? x[i] : top;
  return top;
}

// loss = lse - (1 - smoothing) x[y] - smoothing / V * sum(x), torch's (1 - e) nll + e * mean(-log_softmax). NaN where
// torch gives NaN: a NaN logit (the sum is NaN), a +inf one, or a row all -inf (its max not finite).
template <typename T>
FS2S_ROW_INLINE void cross_entropy_fwd_row(const T* x, int64_t V, int64_t y, T smoothing, T* loss, T* lse) {
  const T top = row_max(x, V);
  const T sum_x = sum_of<T>(V, [&](int64_t i) { return x[i]; });
  if (std::isnan(sum_x) || !std::isfinite(top)) {
    *loss = *lse = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  *lse = top + std::log(sum_of<T>(V, [&](int64_t i) { return exp_nonpositive(x[i] - top); }));
  *loss = *lse - (T(1) - smoothing) * x[y];
  if (smoothing != 0) *loss -= smoothing / T(V) * sum_x;  // 0 * sum_x would make a -inf logit's row NaN
}

// d loss / d x[j] = grad (softmax(x)[j] - smoothing / V - (1 - smoothing) [j == y]).
template <typename T>
FS2S_ROW_INLINE void cross_entropy_bwd_row(const T* x, int64_t V, int64_t y, T smoothing, T lse, T grad, T* gx) {
  if (std::isnan(lse)) {  // the forward's NaN row: exp_nonpositive is not made for NaN
    std::fill(gx, gx + V, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  const T uniform = smoothing / T(V);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) gx[j] = grad * (exp_nonpositive(x[j] - lse) - uniform);
  gx[y] -= grad * (T(1) - smoothing);
}

// What a call's rows read and write, either way.
template <typename T>
struct CrossEntropyRows {
  const T* logits;
  const int64_t* target;
  int64_t V, ignore_index;
  T smoothing;
  T *loss, *lse;                 // forward outputs
  const T *grad_loss, *in_lse;   // backward inputs
  T* grad_logits;                // backward output
};

// Rows [r0, r1) of the forward (kBackward false) or the backward; an ignored row gets zeros.
template <typename T, bool kBackward>
FS2S_ROW_INLINE void cross_entropy_rows(const CrossEntropyRows<T>& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = a.logits + r * a.V;
    const int64_t y = a.target[r];
    if constexpr (kBackward) {
      T* gx = a.grad_logits + r * a.V;
      if (y == a.ignore_index) std::fill(gx, gx + a.V, T(0));
      else cross_entropy_bwd_row(x, a.V, y, a.smoothing, a.in_lse[r], a.grad_loss[r], gx);
    } else {
      if (y == a.ignore_index) a.loss[r] = a.lse[r] = 0;
      else cross_entropy_fwd_row(x, a.V, y, a.smoothing, a.loss + r, a.lse + r);
    }
  }
}

template <typename T, bool kBackward>
void cross_entropy_rows_baseline(const CrossEntropyRows<T>& a, int64_t r0, int64_t r1) {
  cross_entropy_rows<T, kBackward>(a, r0, r1);
}
template <typename T, bool kBackward>
FS2S_TARGET_AVX2 void cross_entropy_rows_avx2(const CrossEntropyRows<T>& a, int64_t r0, int64_t r1) {
  cross_entropy_rows<T, kBackward>(a, r0, r1);
}
template <typename T, bool kBackward>
FS2S_TARGET_AVX512 void cross_entropy_rows_avx512(const CrossEntropyRows<T>& a, int64_t r0, int64_t r1) {
  cross_entropy_rows<T, kBackward>(a, r0, r1);
}

// All N rows in parallel, about 64K logits per task, on the build for this CPU.
template <typename T, bool kBackward>
void run_cross_entropy_rows(const CrossEntropyRows<T>& rows, int64_t N) {
  const auto run = for_this_cpu(cross_entropy_rows_avx512<T, kBackward>, cross_entropy_rows_avx2<T, kBackward>,
                                cross_entropy_rows_baseline<T, kBackward>);
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / rows.V), [&](int64_t r0, int64_t r1) { run(rows, r0, r1); });
}

// logits [N, V] (float32/float64, V >= 1), target int64 [N] of ids in [0, V) or ignore_index, on one CPU device.
void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                              double label_smoothing) {
  check_rank(logits, "logits", 2);
  check_float_dtype(logits, "logits", logits.is_cuda());
  const int64_t N = logits.size(0), V = logits.size(1);
  FS2S_CHECK_ARG(V > 0, "logits", "has no classes (shape ", logits.sizes(), ")");
  check_shape(target, "target", {N});
  FS2S_CHECK_ARG(target.scalar_type() == at::kLong, "target", "expected int64 class ids, got ", target.scalar_type());
  FS2S_CHECK_ARG(target.device() == logits.device(), "target", "is on ", target.device(), " but 'logits' is on ",
                 logits.device());
  FS2S_CHECK_ARG(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing", "must lie in [0, 1], got ",
                 label_smoothing);
  const at::Tensor t = target.contiguous();
  const int64_t* pt = t.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r)
    FS2S_CHECK_ARG(pt[r] == ignore_index || (pt[r] >= 0 && pt[r] < V), "target", "row ", r, " has class ", pt[r],
                   ", outside [0, ", V, ") and not ignore_index ", ignore_index);
}

// The inputs both passes read: contiguous logits x [N, V] and target t [N].
template <typename T>
CrossEntropyRows<T> input_rows(const at::Tensor& x, const at::Tensor& t, int64_t ignore_index, double label_smoothing) {
  CrossEntropyRows<T> rows{};
  rows.logits = x.const_data_ptr<T>();
  rows.target = t.const_data_ptr<int64_t>();
  rows.V = x.size(1), rows.ignore_index = ignore_index, rows.smoothing = static_cast<T>(label_smoothing);
  return rows;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                         int64_t ignore_index, double label_smoothing) {
  check_cross_entropy_args(logits, target, ignore_index, label_smoothing);
  const at::Tensor x = logits.contiguous(), t = target.contiguous();
  const int64_t N = x.size(0);
  at::Tensor loss = at::empty({N}, x.options()), lse = at::empty({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    CrossEntropyRows<scalar_t> rows = input_rows<scalar_t>(x, t, ignore_index, label_smoothing);
    rows.loss = loss.data_ptr<scalar_t>(), rows.lse = lse.data_ptr<scalar_t>();
    run_cross_entropy_rows<scalar_t, false>(rows, N);
  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& lse, int64_t ignore_index, double label_smoothing) {
  check_cross_entropy_args(logits, target, ignore_index, label_smoothing);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_shape(grad_loss, "grad_loss", {N});
  check_like(grad_loss, "grad_loss", logits, "logits");
  check_shape(lse, "lse", {N});
  check_like(lse, "lse", logits, "logits");
  const at::Tensor x = logits.contiguous(), t = target.contiguous(), g = grad_loss.contiguous(), l = lse.contiguous();
  at::Tensor grad_logits = at::empty({N, V}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    CrossEntropyRows<scalar_t> rows = input_rows<scalar_t>(x, t, ignore_index, label_smoothing);
    rows.grad_loss = g.const_data_ptr<scalar_t>(), rows.in_lse = l.const_data_ptr<scalar_t>();
    rows.grad_logits = grad_logits.data_ptr<scalar_t>();
    run_cross_entropy_rows<scalar_t, true>(rows, N);
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastseq2seq, m) {
  // Returns (loss [N], lse [N]): lse (each row's logsumexp, 0 on ignored rows) is saved for the backward.
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing)"
        " -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, int ignore_index,"
        " float label_smoothing) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastseq2seq, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
}

}  // namespace fastseq2seq
