// Attention op schemas and the CPU kernels: per query row one pass over S with an online softmax.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "attention.h"
#include "fast_math.h"

namespace fastseq2seq {
namespace {

// Scores held at once: the running softmax rescales the context accumulator once per tile, not per position.
constexpr int64_t kTileS = 64;

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Dot: q . k; additive (v given): v . tanh(q + k), one element of the [S, D] tanh at a time.
template <typename T>
inline T score(const T* __restrict q, const T* __restrict k, const T* __restrict v, int64_t D) {
  if (!v) return dot(q, k, D);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) sum += v[d] * tanh_fast(q[d] + k[d]);
  return sum;
}

// One query row: context [Dv], lse, and the weights [S] when asked (they hold the raw scores until lse is known).
template <typename T>
void attention_fwd_row(const T* q, const T* keys, const T* values, const bool* mask, const T* v, int64_t S,
                       int64_t D, int64_t Dv, T* context, T* weights, T* lse, T* acc) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T tile[kTileS];
  T running_max = kNegInf, running_sum = 0;
  std::fill(acc, acc + Dv, T(0));
  for (int64_t s0 = 0; s0 < S; s0 += kTileS) {
    const int64_t n = std::min(kTileS, S - s0);
    T tile_max = kNegInf;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = s0 + i;
      tile[i] = (!mask || mask[s]) ? score(q, keys + s * D, v, D) : kNegInf;
      tile_max = std::max(tile_max, tile[i]);
    }
    if (weights) std::copy(tile, tile + n, weights + s0);
    if (tile_max == kNegInf) continue;  // all padding
    const T new_max = std::max(running_max, tile_max);
    if (running_max != kNegInf && new_max != running_max) {
      const T alpha = exp_approx(running_max - new_max);
      running_sum *= alpha;
      for (int64_t j = 0; j < Dv; ++j) acc[j] *= alpha;
    }
    for (int64_t i = 0; i < n; ++i) {
      if (tile[i] == kNegInf) continue;
      const T p = exp_approx(tile[i] - new_max);
      running_sum += p;
      axpy(p, values + (s0 + i) * Dv, acc, Dv);
    }
    running_max = new_max;
  }
  if (running_sum == T(0)) {  // no real position: zeros, and an lse that makes every recomputed weight 0
    std::fill(context, context + Dv, T(0));
    if (weights) std::fill(weights, weights + S, T(0));
    *lse = std::numeric_limits<T>::infinity();
    return;
  }
  const T inv_sum = T(1) / running_sum;
  for (int64_t j = 0; j < Dv; ++j) context[j] = acc[j] * inv_sum;
  *lse = running_max + std::log(running_sum);
  if (weights)
    for (int64_t s = 0; s < S; ++s) weights[s] = (!mask || mask[s]) ? exp_approx(weights[s] - *lse) : T(0);
}

// All query rows of one batch element (their key and value gradients add up). Recomputes the weights from lse;
// p and dp are [S] scratch. grad_keys, grad_values and grad_v_partial are zero on entry.
template <typename T>
void attention_bwd_batch(const T* query, const T* keys, const T* values, const bool* mask, const T* v,
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
      p[s] = exp_approx(score(q, keys + s * D, v, D) - lse[t]);
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
        const T th = tanh_fast(q[d] + k[d]);
        const T g = ds * v[d] * (T(1) - th * th);
        dq[d] += g;
        dk[d] += g;
        grad_v_partial[d] += ds * th;
      }
    }
  }
}

const bool* mask_ptr(const at::Tensor& mask) { return mask.defined() ? mask.const_data_ptr<bool>() : nullptr; }

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
    const scalar_t *pq = q.const_data_ptr<scalar_t>(), *pk = k.const_data_ptr<scalar_t>(),
                   *pvals = vals.const_data_ptr<scalar_t>(), *pv = vv.defined() ? vv.const_data_ptr<scalar_t>() : nullptr;
    const bool* pm = mask_ptr(m);
    scalar_t *pctx = context.data_ptr<scalar_t>(), *plse = lse.data_ptr<scalar_t>();
    scalar_t* pw = return_weights ? weights.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B * Tq, grain, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> acc(Dv);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / Tq;
        attention_fwd_row(pq + r * D, pk + b * S * D, pvals + b * S * Dv, pm ? pm + b * S : nullptr, pv, S, D, Dv,
                          pctx + r * Dv, pw ? pw + r * S : nullptr, plse + r, acc.data());
      }
    });
  });
  return {context, weights, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& v, const at::Tensor& lse) {
  check_attention_args(query, keys, values, mask, v);
  check_attention_bwd_args(grad_context, grad_weights, query, keys, values, lse);
  const int64_t B = query.size(0), Tq = query.size(1), D = query.size(2), S = keys.size(1), Dv = values.size(2);
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), vals = values.contiguous(),
                   go = grad_context.contiguous(), ls = lse.contiguous();
  const at::Tensor m = mask ? mask->contiguous() : at::Tensor(), vv = v ? v->contiguous() : at::Tensor(),
                   gw = grad_weights ? grad_weights->contiguous() : at::Tensor();
  at::Tensor grad_query = at::empty({B, Tq, D}, query.options());
  at::Tensor grad_keys = at::zeros({B, S, D}, query.options());
  at::Tensor grad_values = at::zeros({B, S, Dv}, query.options());
  // Each batch element adds its share of grad_v into its own row: no two threads write one element.
  at::Tensor grad_v_partial = at::zeros({v ? B : 0, D}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "attention_bwd_cpu", [&] {
    const scalar_t *pq = q.const_data_ptr<scalar_t>(), *pk = k.const_data_ptr<scalar_t>(),
                   *pvals = vals.const_data_ptr<scalar_t>(), *pgo = go.const_data_ptr<scalar_t>(),
                   *plse = ls.const_data_ptr<scalar_t>(),
                   *pv = vv.defined() ? vv.const_data_ptr<scalar_t>() : nullptr,
                   *pgw = gw.defined() ? gw.const_data_ptr<scalar_t>() : nullptr;
    const bool* pm = mask_ptr(m);
    scalar_t *pdq = grad_query.data_ptr<scalar_t>(), *pdk = grad_keys.data_ptr<scalar_t>(),
             *pdvals = grad_values.data_ptr<scalar_t>(), *pdv = pv ? grad_v_partial.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> p(S), dp(S);
      for (int64_t b = b0; b < b1; ++b)
        attention_bwd_batch(pq + b * Tq * D, pk + b * S * D, pvals + b * S * Dv, pm ? pm + b * S : nullptr, pv,
                            pgo + b * Tq * Dv, pgw ? pgw + b * Tq * S : nullptr, plse + b * Tq, Tq, S, D, Dv,
                            pdq + b * Tq * D, pdk + b * S * D, pdvals + b * S * Dv, pdv ? pdv + b * D : nullptr,
                            p.data(), dp.data());
    });
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
