// Attention op schemas and the CPU kernels: forward, per query row one pass over S with an online softmax; backward,
// a fused row loop, or batched matrix products for dot scores with several query rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "attention.h"
#include "cpu_dispatch.h"
#include "fast_math.h"

namespace fastseq2seq {
namespace {

// Scores held at once: the running softmax rescales the context accumulator once per tile, not per position.
constexpr int64_t kTileS = 64;
// Query rows of one batch element that share each load of a key and of a value row.
constexpr int64_t kRowGroup = 4;


template <typename T>
FS2S_ROW_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  return sum_of<T>(n, [&](int64_t i) { return a[i] * b[i]; });
}

template <typename T>
FS2S_ROW_INLINE void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Dot: q . k; additive (v given): v . tanh(q + k), one element of the [S, D] tanh at a time.
template <typename T>
FS2S_ROW_INLINE T score(const T* __restrict q, const T* __restrict k, const T* __restrict v, int64_t D) {
  if (!v) return dot(q, k, D);
  return sum_of<T>(D, [&](int64_t d) { return v[d] * tanh_vectorizable(q[d] + k[d]); });
}

// x . y0, ..., x . y3 at once: each load of x serves four products, and the four sums are independent.
template <typename T>
FS2S_ROW_INLINE void dot4(const T* __restrict x, const T* __restrict y0, const T* __restrict y1,
                          const T* __restrict y2, const T* __restrict y3, int64_t n, T* out) {
  constexpr int64_t kWidth = 8;
  T s0[kWidth] = {}, s1[kWidth] = {}, s2[kWidth] = {}, s3[kWidth] = {};
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth)
#pragma omp simd
    for (int64_t j = 0; j < kWidth; ++j) {
      const T xj = x[i + j];
      s0[j] += xj * y0[i + j];
      s1[j] += xj * y1[i + j];
      s2[j] += xj * y2[i + j];
      s3[j] += xj * y3[i + j];
    }
  T t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (; i < n; ++i) {
    t0 += x[i] * y0[i];
    t1 += x[i] * y1[i];
    t2 += x[i] * y2[i];
    t3 += x[i] * y3[i];
  }
  for (int64_t j = 0; j < kWidth; ++j) {
    t0 += s0[j];
    t1 += s1[j];
    t2 += s2[j];
    t3 += s3[j];
  }
  out[0] = t0, out[1] = t1, out[2] = t2, out[3] = t3;
}

// Scores of the positions at[0..n).
template <typename T>
FS2S_ROW_INLINE void scores_at(const T* q, const T* keys, const T* v, int64_t D, const int64_t* at, int64_t n,
                               T* out) {
  int64_t c = 0;
  if (!v)
    for (; c + 4 <= n; c += 4)
      dot4(q, keys + at[c] * D, keys + at[c + 1] * D, keys + at[c + 2] * D, keys + at[c + 3] * D, D, out + c);
  for (; c < n; ++c) out[c] = score(q, keys + at[c] * D, v, D);
}

// acc += sum_c p[c] values[at[c]], four rows of values per pass over acc.
template <typename T>
FS2S_ROW_INLINE void add_weighted_rows(T* __restrict acc, const T* __restrict values, int64_t Dv, const int64_t* at,
                                       const T* p, int64_t n) {
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const T *v0 = values + at[c] * Dv, *v1 = values + at[c + 1] * Dv, *v2 = values + at[c + 2] * Dv,
            *v3 = values + at[c + 3] * Dv;
    const T p0 = p[c], p1 = p[c + 1], p2 = p[c + 2], p3 = p[c + 3];
#pragma omp simd
    for (int64_t j = 0; j < Dv; ++j) acc[j] += p0 * v0[j] + p1 * v1[j] + p2 * v2[j] + p3 * v3[j];
  }
  for (; c < n; ++c) axpy(p[c], values + at[c] * Dv, acc, Dv);
}

// Scores of rows g < G of q [G, D] (one batch element) against the positions at[0..n). A single row shares each
// load of q over four keys; several rows with dot scores share each load of a key over up to four rows.
template <typename T>
FS2S_ROW_INLINE void group_scores(const T* q, int64_t G, const T* keys, const T* v, int64_t D, const int64_t* at,
                                  int64_t n, T (*out)[kTileS]) {
  if (G == 1 || v) {
    for (int64_t g = 0; g < G; ++g) scores_at(q + g * D, keys, v, D, at, n, out[g]);
    return;
  }
  const T* row[kRowGroup];
  for (int64_t g = 0; g < kRowGroup; ++g) row[g] = q + std::min(g, G - 1) * D;  // spare lanes repeat the last row
  T four[kRowGroup];
  for (int64_t c = 0; c < n; ++c) {
    dot4(keys + at[c] * D, row[0], row[1], row[2], row[3], D, four);
    for (int64_t g = 0; g < G; ++g) out[g][c] = four[g];
  }
}

// G <= kRowGroup consecutive query rows of one batch element, streamed over S in tiles with an online softmax:
// context [G, Dv], lse [G], and the weights [G, S] when asked (they hold the raw scores until lse is known).
// acc is [kRowGroup, Dv] scratch.
template <typename T>
FS2S_ROW_INLINE void attention_fwd_group(const T* q, int64_t G, const T* keys, const T* values, const bool* mask,
                                         const T* v, int64_t S, int64_t D, int64_t Dv, T* context, T* weights,
                                         T* lse, T* acc) {
  int64_t real[kTileS];      // the tile's real positions
  T tile[kRowGroup][kTileS];  // per row: their scores, then their unnormalized weights
  T running_max[kRowGroup], running_sum[kRowGroup];
  std::fill(running_max, running_max + G, -std::numeric_limits<T>::infinity());
  std::fill(running_sum, running_sum + G, T(0));
  std::fill(acc, acc + G * Dv, T(0));
  for (int64_t s0 = 0; s0 < S; s0 += kTileS) {
    int64_t n = 0;
    for (int64_t s = s0; s < std::min(S, s0 + kTileS); ++s)
      if (!mask || mask[s]) real[n++] = s;
    if (n == 0) continue;
    group_scores(q, G, keys, v, D, real, n, tile);
    for (int64_t g = 0; g < G; ++g) {
      T new_max = running_max[g];
      for (int64_t c = 0; c < n; ++c) {
        new_max = std::max(new_max, tile[g][c]);
        if (weights) weights[g * S + real[c]] = tile[g][c];
      }
      if (new_max != running_max[g]) {  // acc and running_sum are still 0 when running_max is -inf
        const T alpha = exp_nonpositive(running_max[g] - new_max);
        running_sum[g] *= alpha;
        for (int64_t j = 0; j < Dv; ++j) acc[g * Dv + j] *= alpha;
      }
      for (int64_t c = 0; c < n; ++c) {
        tile[g][c] = exp_nonpositive(tile[g][c] - new_max);
        running_sum[g] += tile[g][c];
      }
      running_max[g] = new_max;
    }
    // Four value rows at a time, for every row of the group while they are in L1.
    for (int64_t c = 0; c < n; c += 4)
      for (int64_t g = 0; g < G; ++g)
        add_weighted_rows(acc + g * Dv, values, Dv, real + c, tile[g] + c, std::min<int64_t>(4, n - c));
  }
  for (int64_t g = 0; g < G; ++g) {
    T* ctx = context + g * Dv;
    T* w = weights ? weights + g * S : nullptr;
    if (running_sum[g] == T(0)) {  // no real position: zeros, and an lse that makes every recomputed weight 0
      std::fill(ctx, ctx + Dv, T(0));
      if (w) std::fill(w, w + S, T(0));
      lse[g] = std::numeric_limits<T>::infinity();
      continue;
    }
    const T inv_sum = T(1) / running_sum[g];
    for (int64_t j = 0; j < Dv; ++j) ctx[j] = acc[g * Dv + j] * inv_sum;
    lse[g] = running_max[g] + std::log(running_sum[g]);
    if (w)
      for (int64_t s = 0; s < S; ++s) w[s] = (!mask || mask[s]) ? exp_nonpositive(w[s] - lse[g]) : T(0);
  }
}

// All query rows of one batch element (their key and value gradients add up), recomputing the weights from lse and,
// for additive scores, the tanh terms element by element so that no [S, D] tensor exists; p and dp are [S] scratch.
// grad_keys, grad_values and grad_v_partial are zero on entry.
template <typename T>
FS2S_ROW_INLINE void attention_bwd_batch(const T* query, const T* keys, const T* values, const bool* mask, const T* v,
                         const T* grad_context, const T* grad_weights, const T* lse, int64_t Tq, int64_t S,
                         int64_t D, int64_t Dv, T* grad_query, T* grad_keys, T* grad_values, T* grad_v_partial, T* p,
                         T* dp) {
  for (int64_t t = 0; t < Tq; ++t) {
    const T* q = query + t * D;
    const T* go = grad_context + t * Dv;
    T* dq = grad_query + t * D;
    std::fill(dq, dq + D, T(0));
    if (lse[t] == std::numeric_limits<T>::infinity()) continue;  // no real position: zero gradients
    T delta = 0;  // sum_s p_s dp_s, the softmax backward's row term
    for (int64_t s = 0; s < S; ++s) {
      if (mask && !mask[s]) {
        p[s] = dp[s] = 0;
        continue;
      }
      p[s] = exp_nonpositive(score(q, keys + s * D, v, D) - lse[t]);
      dp[s] = dot(go, values + s * Dv, Dv) + (grad_weights ? grad_weights[t * S + s] : T(0));
      delta += p[s] * dp[s];
    }
    for (int64_t s = 0; s < S; ++s) {
      if (p[s] == T(0)) continue;  // padding, or a weight that underflowed: no contribution
      const T* k = keys + s * D;
      T* dk = grad_keys + s * D;
      const T ds = p[s] * (dp[s] - delta);
      axpy(p[s], go, grad_values + s * Dv, Dv);
      if (!v) {
        axpy(ds, k, dq, D);
        axpy(ds, q, dk, D);
        continue;
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const T th = tanh_vectorizable(q[d] + k[d]);
        const T g = ds * v[d] * (T(1) - th * th);
        dq[d] += g;
        dk[d] += g;
        grad_v_partial[d] += ds * th;
      }
    }
  }
}

template <typename T>
struct AttentionRows {
  const T *query, *keys, *values, *v, *grad_context, *grad_weights, *lse;
  const bool* mask;
  int64_t Tq, S, D, Dv;
  T *context, *weights, *out_lse, *grad_query, *grad_keys, *grad_values, *grad_v_partial;
};

// Forward of query rows r0..r1 (row r = b * Tq + t), in groups of consecutive rows of one batch element.
template <typename T>
FS2S_ROW_INLINE void attention_fwd_rows(const AttentionRows<T>& a, int64_t r0, int64_t r1) {
  std::vector<T> acc(kRowGroup * a.Dv);
  for (int64_t r = r0; r < r1;) {
    const int64_t b = r / a.Tq, G = std::min({kRowGroup, r1 - r, (b + 1) * a.Tq - r});
    attention_fwd_group(a.query + r * a.D, G, a.keys + b * a.S * a.D, a.values + b * a.S * a.Dv,
                        a.mask ? a.mask + b * a.S : nullptr, a.v, a.S, a.D, a.Dv, a.context + r * a.Dv,
                        a.weights ? a.weights + r * a.S : nullptr, a.out_lse + r, acc.data());
    r += G;
  }
}

// Backward of batch elements b0..b1.
template <typename T>
FS2S_ROW_INLINE void attention_bwd_rows(const AttentionRows<T>& a, int64_t b0, int64_t b1) {
  std::vector<T> p(a.S), dp(a.S);
  const int64_t Tq = a.Tq, S = a.S, D = a.D, Dv = a.Dv;
  for (int64_t b = b0; b < b1; ++b) {
    // Zeroed here, just before this element's passes accumulate into them in cache, not as a separate pass.
    std::fill(a.grad_keys + b * S * D, a.grad_keys + (b + 1) * S * D, T(0));
    std::fill(a.grad_values + b * S * Dv, a.grad_values + (b + 1) * S * Dv, T(0));
    attention_bwd_batch(a.query + b * Tq * D, a.keys + b * S * D, a.values + b * S * Dv,
                        a.mask ? a.mask + b * S : nullptr, a.v, a.grad_context + b * Tq * Dv,
                        a.grad_weights ? a.grad_weights + b * Tq * S : nullptr, a.lse + b * Tq, Tq, S, D, Dv,
                        a.grad_query + b * Tq * D, a.grad_keys + b * S * D, a.grad_values + b * S * Dv,
                        a.grad_v_partial ? a.grad_v_partial + b * D : nullptr, p.data(), dp.data());
  }
}

template <typename T>
void attention_fwd_rows_baseline(const AttentionRows<T>& a, int64_t r0, int64_t r1) { attention_fwd_rows(a, r0, r1); }
template <typename T>
FS2S_TARGET_AVX2 void attention_fwd_rows_avx2(const AttentionRows<T>& a, int64_t r0, int64_t r1) {
  attention_fwd_rows(a, r0, r1);
}
template <typename T>
FS2S_TARGET_AVX512 void attention_fwd_rows_avx512(const AttentionRows<T>& a, int64_t r0, int64_t r1) {
  attention_fwd_rows(a, r0, r1);
}
template <typename T>
void attention_bwd_rows_baseline(const AttentionRows<T>& a, int64_t b0, int64_t b1) { attention_bwd_rows(a, b0, b1); }
template <typename T>
FS2S_TARGET_AVX2 void attention_bwd_rows_avx2(const AttentionRows<T>& a, int64_t b0, int64_t b1) {
  attention_bwd_rows(a, b0, b1);
}
template <typename T>
FS2S_TARGET_AVX512 void attention_bwd_rows_avx512(const AttentionRows<T>& a, int64_t b0, int64_t b1) {
  attention_bwd_rows(a, b0, b1);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query, const at::Tensor& keys,
                                                                 const at::Tensor& values,
                                                                 const std::optional<at::Tensor>& mask,
                                                                 const std::optional<at::Tensor>& v,
                                                                 bool return_weights) {
  check_attention_args(query, keys, values, mask, v);
  const int64_t B = query.size(0), Tq = query.size(1), D = query.size(2), S = keys.size(1), Dv = values.size(2);
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), vals = values.contiguous();
  const at::Tensor m = mask ? mask->contiguous() : at::Tensor(), vv = v ? v->contiguous() : at::Tensor();
  at::Tensor context = at::empty({B, Tq, Dv}, query.options());
  at::Tensor weights = at::empty({return_weights ? B : 0, Tq, S}, query.options());
  at::Tensor lse = at::empty({B, Tq}, query.options().dtype(attention_stats_dtype(query.scalar_type())));
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, S * (D + Dv)));
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "attention_fwd_cpu", [&] {
    AttentionRows<scalar_t> rows{};
    rows.query = q.const_data_ptr<scalar_t>();
    rows.keys = k.const_data_ptr<scalar_t>();
    rows.values = vals.const_data_ptr<scalar_t>();
    rows.v = ptr_or_null<scalar_t>(vv);
    rows.mask = ptr_or_null<bool>(m);
    rows.Tq = Tq, rows.S = S, rows.D = D, rows.Dv = Dv;
    rows.context = context.data_ptr<scalar_t>();
    rows.weights = return_weights ? weights.data_ptr<scalar_t>() : nullptr;
    rows.out_lse = lse.data_ptr<scalar_t>();
    const auto run = for_this_cpu(attention_fwd_rows_avx512<scalar_t>, attention_fwd_rows_avx2<scalar_t>,
                                  attention_fwd_rows_baseline<scalar_t>);
    at::parallel_for(0, B * Tq, grain, [&](int64_t r0, int64_t r1) { run(rows, r0, r1); });
  });
  return {context, weights, lse};
}

// Dot scores with several query rows per batch element (teacher-forced Luong attention): the backward as batched
// matrix products (flash-attention's, with the weights recomputed from lse), which MKL runs faster than the row
// loop's dot products and axpys; for one query row the row loop, which skips these ops' fixed costs, wins. Query rows
// go in chunks that keep each [B, chunk, S] temporary under kDotBwdElements; there is at least one (T > 1).
constexpr int64_t kDotBwdElements = int64_t(1) << 22;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_dot_bwd_cpu(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& mask, const at::Tensor& lse) {
  const int64_t B = query.size(0), Tq = query.size(1), S = keys.size(1);
  at::Tensor grad_query = at::empty_like(query, at::MemoryFormat::Contiguous);
  at::Tensor grad_keys = at::empty_like(keys, at::MemoryFormat::Contiguous);
  at::Tensor grad_values = at::empty_like(values, at::MemoryFormat::Contiguous);
  const int64_t chunk = std::max<int64_t>(1, kDotBwdElements / std::max<int64_t>(1, B * S));
  const at::Tensor keys_t = keys.transpose(1, 2), values_t = values.transpose(1, 2);
  for (int64_t t0 = 0; t0 < Tq; t0 += chunk) {
    const int64_t n = std::min(chunk, Tq - t0);
    const at::Tensor q = query.narrow(1, t0, n), go = grad_context.narrow(1, t0, n);
    // lse is +inf on a row with no real position: its weights come out 0, and so do its gradients.
    at::Tensor p = at::bmm(q, keys_t).sub_(lse.narrow(1, t0, n).unsqueeze(2).to(query.scalar_type())).exp_();
    if (mask) p.masked_fill_(mask->logical_not().unsqueeze(1), 0);
    at::Tensor dp = at::bmm(go, values_t);
    if (grad_weights) dp.add_(grad_weights->narrow(1, t0, n));
    const at::Tensor delta = (p * dp).sum(2, /*keepdim=*/true);  // the softmax backward's row term
    const at::Tensor ds = dp.sub_(delta).mul_(p);
    grad_query.narrow(1, t0, n).copy_(at::bmm(ds, keys));
    if (t0 == 0) {  // the first chunk writes the key and value gradients, the others add to them
      at::bmm_out(grad_keys, ds.transpose(1, 2), q);
      at::bmm_out(grad_values, p.transpose(1, 2), go);
    } else {
      grad_keys.baddbmm_(ds.transpose(1, 2), q);
      grad_values.baddbmm_(p.transpose(1, 2), go);
    }
  }
  return {grad_query, grad_keys, grad_values, at::empty({0}, query.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& v, const at::Tensor& lse) {
  check_attention_args(query, keys, values, mask, v);
  check_attention_bwd_args(grad_context, grad_weights, query, keys, values, lse);
  if (!v && query.size(1) > 1)
    return attention_dot_bwd_cpu(grad_context, grad_weights, query, keys, values, mask, lse);
  const int64_t B = query.size(0), Tq = query.size(1), D = query.size(2), S = keys.size(1), Dv = values.size(2);
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), vals = values.contiguous(),
                   go = grad_context.contiguous(), ls = lse.contiguous();
  const at::Tensor m = mask ? mask->contiguous() : at::Tensor(), vv = v ? v->contiguous() : at::Tensor(),
                   gw = grad_weights ? grad_weights->contiguous() : at::Tensor();
  at::Tensor grad_query = at::empty({B, Tq, D}, query.options());
  at::Tensor grad_keys = at::empty({B, S, D}, query.options());
  at::Tensor grad_values = at::empty({B, S, Dv}, query.options());
  // Each batch element adds its share of grad_v into its own row: no two threads write one element.
  at::Tensor grad_v_partial = at::zeros({v ? B : 0, D}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "attention_bwd_cpu", [&] {
    AttentionRows<scalar_t> rows{};
    rows.query = q.const_data_ptr<scalar_t>();
    rows.keys = k.const_data_ptr<scalar_t>();
    rows.values = vals.const_data_ptr<scalar_t>();
    rows.v = ptr_or_null<scalar_t>(vv);
    rows.grad_context = go.const_data_ptr<scalar_t>();
    rows.grad_weights = ptr_or_null<scalar_t>(gw);
    rows.lse = ls.const_data_ptr<scalar_t>();
    rows.mask = ptr_or_null<bool>(m);
    rows.Tq = Tq, rows.S = S, rows.D = D, rows.Dv = Dv;
    rows.grad_query = grad_query.data_ptr<scalar_t>();
    rows.grad_keys = grad_keys.data_ptr<scalar_t>();
    rows.grad_values = grad_values.data_ptr<scalar_t>();
    rows.grad_v_partial = v ? grad_v_partial.data_ptr<scalar_t>() : nullptr;
    const auto run = for_this_cpu(attention_bwd_rows_avx512<scalar_t>, attention_bwd_rows_avx2<scalar_t>,
                                  attention_bwd_rows_baseline<scalar_t>);
    // Rows of one batch element share their keys' and values' gradients: split the work by batch element.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { run(rows, b0, b1); });
  });
  at::Tensor grad_v = v ? grad_v_partial.sum(0) : at::empty({0}, query.options());
  return {grad_query, grad_keys, grad_values, grad_v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastseq2seq, m) {
  // query [B, T, D], keys [B, S, D], values [B, S, Dv], mask bool [B, S] (true = real; None = all real),
  // v [D] (given: additive scores v . tanh(q + k); None: dot scores q . k).
  // Returns (context [B, T, Dv], weights [B, T, S] or [0, T, S] when not asked for, lse [B, T]): lse is the
  // log-sum-exp of the real scores (+inf for a row without one), float32 or float64 for float64 inputs.
  m.def("attention_fwd(Tensor query, Tensor keys, Tensor values, Tensor? mask, Tensor? v, bool return_weights)"
        " -> (Tensor, Tensor, Tensor)");
  // Recomputes the weights from lse. Returns (grad_query, grad_keys, grad_values, grad_v); grad_v is [0] without v.
  m.def("attention_bwd(Tensor grad_context, Tensor? grad_weights, Tensor query, Tensor keys, Tensor values,"
        " Tensor? mask, Tensor? v, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastseq2seq, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastseq2seq
