// Attention CUDA kernels. Forward: one block per query row (or per (row, slice of S) when there are too few rows
// to fill the GPU, flash-decoding style, and a combine kernel), a warp per source position at a time, each warp
// keeping its own running max / sum / context, merged at the end. Backward: one block per query row recomputing
// the weights from lse, keys' and values' gradients added atomically (rows of one batch element share them).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <math_constants.h>
#include <torch/library.h>

#include <type_traits>

#include "attention.h"

namespace fastseq2seq {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A slice of S per block is worth its combine only below this many rows per SM.
constexpr int64_t kMinSlice = 256;

template <typename T>
__device__ __forceinline__ T infinity();
template <>
__device__ __forceinline__ float infinity<float>() { return CUDART_INF_F; }
template <>
__device__ __forceinline__ double infinity<double>() { return CUDART_INF; }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Score of one source position, computed by one warp (lanes split D); every lane gets the result.
// v_s null: dot q . k; else additive v . tanh(q + k), never materialized beyond one element per lane.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_score(const acc_t* q_s, const scalar_t* __restrict__ k, const acc_t* v_s,
                                            int64_t D, int lane) {
  acc_t sum = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t kd = static_cast<acc_t>(k[d]);
    sum += v_s ? v_s[d] * tanh(q_s[d] + kd) : q_s[d] * kd;
  }
  return warp_sum(sum);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const acc_t* a_s, const scalar_t* __restrict__ b, int64_t n, int lane) {
  acc_t sum = 0;
  for (int64_t j = lane; j < n; j += 32) sum += a_s[j] * static_cast<acc_t>(b[j]);
  return warp_sum(sum);
}

template <typename T>
__device__ __forceinline__ T rescale(T partial_max, T new_max) {  // 0 for a part that saw no real position
  return partial_max == -infinity<T>() ? T(0) : exp(partial_max - new_max);
}

// grid (B*T rows, slices of S). Writes context and lse directly with one slice, else the slice's partial
// (max, sum, unnormalized context) for attention_combine_kernel. scores (raw, per real position) when not null.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(
    const scalar_t* __restrict__ query, const scalar_t* __restrict__ keys, const scalar_t* __restrict__ values,
    const bool* __restrict__ mask, const scalar_t* __restrict__ v, int64_t T, int64_t S, int64_t D, int64_t Dv,
    int64_t slice, scalar_t* __restrict__ context, acc_t* __restrict__ lse, acc_t* __restrict__ scores,
    acc_t* __restrict__ part_max, acc_t* __restrict__ part_sum, acc_t* __restrict__ part_acc) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem);
  acc_t* v_s = q_s + D;
  acc_t* acc_s = v_s + D;  // [kWarps, Dv]
  acc_t* max_s = acc_s + kWarps * Dv;
  acc_t* sum_s = max_s + kWarps;
  const int64_t row = blockIdx.x, b = row / T;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    q_s[d] = static_cast<acc_t>(query[row * D + d]);
    if (v) v_s[d] = static_cast<acc_t>(v[d]);
  }
  for (int64_t j = threadIdx.x; j < kWarps * Dv; j += kThreads) acc_s[j] = 0;
  __syncthreads();
  const scalar_t* k_b = keys + b * S * D;
  const scalar_t* val_b = values + b * S * Dv;
  const int64_t s_end = (blockIdx.y + 1) * slice < S ? (blockIdx.y + 1) * slice : S;
  acc_t* acc = acc_s + warp * Dv;
  acc_t running_max = -infinity<acc_t>(), running_sum = 0;
  for (int64_t s = blockIdx.y * slice + warp; s < s_end; s += kWarps) {
    if (mask && !mask[b * S + s]) continue;
    const acc_t e = warp_score(q_s, k_b + s * D, v ? v_s : nullptr, D, lane);
    if (scores && lane == 0) scores[row * S + s] = e;
    const acc_t new_max = e > running_max ? e : running_max;
    const acc_t alpha = rescale(running_max, new_max), p = exp(e - new_max);
    running_sum = running_sum * alpha + p;
    for (int64_t j = lane; j < Dv; j += 32) acc[j] = acc[j] * alpha + p * static_cast<acc_t>(val_b[s * Dv + j]);
    running_max = new_max;
  }
  if (lane == 0) {
    max_s[warp] = running_max;
    sum_s[warp] = running_sum;
  }
  __syncthreads();
  acc_t block_max = -infinity<acc_t>(), block_sum = 0;
  for (int w = 0; w < kWarps; ++w) block_max = max_s[w] > block_max ? max_s[w] : block_max;
  for (int w = 0; w < kWarps; ++w) block_sum += sum_s[w] * rescale(max_s[w], block_max);
  const int64_t part = row * gridDim.y + blockIdx.y;
  for (int64_t j = threadIdx.x; j < Dv; j += kThreads) {
    acc_t sum = 0;
    for (int w = 0; w < kWarps; ++w) sum += acc_s[w * Dv + j] * rescale(max_s[w], block_max);
    if (part_acc)
      part_acc[part * Dv + j] = sum;
    else
      context[row * Dv + j] = block_sum > 0 ? sum / block_sum : acc_t(0);
  }
  if (threadIdx.x == 0) {
    if (part_acc) {
      part_max[part] = block_max;
      part_sum[part] = block_sum;
    } else {
      lse[row] = block_sum > 0 ? block_max + log(block_sum) : infinity<acc_t>();
    }
  }
}

// One block per query row: merges the slices' partial softmax states.
template <typename scalar_t, typename acc_t>
__global__ void attention_combine_kernel(const acc_t* __restrict__ part_max, const acc_t* __restrict__ part_sum,
                                         const acc_t* __restrict__ part_acc, int64_t slices, int64_t Dv,
                                         scalar_t* __restrict__ context, acc_t* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const acc_t* pm = part_max + row * slices;
  const acc_t* ps = part_sum + row * slices;
  acc_t row_max = -infinity<acc_t>(), row_sum = 0;
  for (int64_t i = 0; i < slices; ++i) row_max = pm[i] > row_max ? pm[i] : row_max;
  for (int64_t i = 0; i < slices; ++i) row_sum += ps[i] * rescale(pm[i], row_max);
  for (int64_t j = threadIdx.x; j < Dv; j += blockDim.x) {
    acc_t sum = 0;
    for (int64_t i = 0; i < slices; ++i) sum += part_acc[(row * slices + i) * Dv + j] * rescale(pm[i], row_max);
    context[row * Dv + j] = row_sum > 0 ? sum / row_sum : acc_t(0);
  }
  if (threadIdx.x == 0) lse[row] = row_sum > 0 ? row_max + log(row_sum) : infinity<acc_t>();
}

// One block per query row: weights = exp(score - lse) at real positions, 0 elsewhere. May run in place
// (weights aliasing scores) when scalar_t is acc_t: each element is read before it is written, by one thread.
template <typename scalar_t, typename acc_t>
__global__ void attention_weights_kernel(const acc_t* scores, const acc_t* __restrict__ lse,
                                         const bool* __restrict__ mask, int64_t T, int64_t S, scalar_t* weights) {
  const int64_t row = blockIdx.x, b = row / T;
  const acc_t row_lse = lse[row];
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const bool real = (!mask || mask[b * S + s]) && row_lse != infinity<acc_t>();
    weights[row * S + s] = real ? exp(scores[row * S + s] - row_lse) : acc_t(0);
  }
}

// One block per query row. Pass 1: delta = sum_s p_s dp_s with p recomputed from lse and dp = dO . v_s (+ the
// weights' gradient). Pass 2: recomputes p and dp again (cheaper than storing [B, T, S] twice) and scatters
// ds = p (dp - delta) into the gradients. grad_keys, grad_values, grad_v: zeroed acc_t buffers.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(
    const scalar_t* __restrict__ query, const scalar_t* __restrict__ keys, const scalar_t* __restrict__ values,
    const bool* __restrict__ mask, const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_context,
    const scalar_t* __restrict__ grad_weights, const acc_t* __restrict__ lse, int64_t T, int64_t S, int64_t D,
    int64_t Dv, scalar_t* __restrict__ grad_query, acc_t* __restrict__ grad_keys, acc_t* __restrict__ grad_values,
    acc_t* __restrict__ grad_v) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* q_s = reinterpret_cast<acc_t*>(smem);
  acc_t* v_s = q_s + D;
  acc_t* dq_s = v_s + D;
  acc_t* dv_s = dq_s + D;
  acc_t* go_s = dv_s + D;
  acc_t* delta_s = go_s + Dv;  // [kWarps]
  const int64_t row = blockIdx.x, b = row / T;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const acc_t row_lse = lse[row];
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    q_s[d] = static_cast<acc_t>(query[row * D + d]);
    if (v) v_s[d] = static_cast<acc_t>(v[d]);
    dq_s[d] = dv_s[d] = 0;
  }
  for (int64_t j = threadIdx.x; j < Dv; j += kThreads) go_s[j] = static_cast<acc_t>(grad_context[row * Dv + j]);
  __syncthreads();
  const scalar_t* k_b = keys + b * S * D;
  const scalar_t* val_b = values + b * S * Dv;
  const acc_t* vs = v ? v_s : nullptr;
  if (row_lse != infinity<acc_t>()) {  // a row without a real position keeps zero gradients
    acc_t delta = 0;
    for (int64_t s = warp; s < S; s += kWarps) {
      if (mask && !mask[b * S + s]) continue;
      const acc_t p = exp(warp_score(q_s, k_b + s * D, vs, D, lane) - row_lse);
      const acc_t dp = warp_dot(go_s, val_b + s * Dv, Dv, lane) +
                       (grad_weights ? static_cast<acc_t>(grad_weights[row * S + s]) : acc_t(0));
      delta += p * dp;
    }
    if (lane == 0) delta_s[warp] = delta;
    __syncthreads();
    delta = 0;
    for (int w = 0; w < kWarps; ++w) delta += delta_s[w];
    for (int64_t s = warp; s < S; s += kWarps) {
      if (mask && !mask[b * S + s]) continue;
      const scalar_t* k = k_b + s * D;
      const acc_t p = exp(warp_score(q_s, k, vs, D, lane) - row_lse);
      if (p == acc_t(0)) continue;
      const acc_t dp = warp_dot(go_s, val_b + s * Dv, Dv, lane) +
                       (grad_weights ? static_cast<acc_t>(grad_weights[row * S + s]) : acc_t(0));
      const acc_t ds = p * (dp - delta);
      acc_t* dk = grad_keys + (b * S + s) * D;
      for (int64_t j = lane; j < Dv; j += 32) atomicAdd(grad_values + (b * S + s) * Dv + j, p * go_s[j]);
      for (int64_t d = lane; d < D; d += 32) {
        const acc_t kd = static_cast<acc_t>(k[d]);
        if (v) {  // tanh recomputed, never stored
          const acc_t th = tanh(q_s[d] + kd);
          const acc_t g = ds * v_s[d] * (acc_t(1) - th * th);
          atomicAdd(dq_s + d, g);
          atomicAdd(dk + d, g);
          atomicAdd(dv_s + d, ds * th);
        } else {
          atomicAdd(dq_s + d, ds * kd);
          atomicAdd(dk + d, ds * q_s[d]);
        }
      }
    }
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    grad_query[row * D + d] = dq_s[d];
    if (v) atomicAdd(grad_v + d, dv_s[d]);
  }
}

// Opts a kernel into more than the default 48 KiB of dynamic shared memory when its row needs it.
template <typename Kernel>
void reserve_shared_memory(Kernel kernel, size_t bytes) {
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  FS2S_CHECK_ARG(bytes <= limit, "query", "D and Dv are too large for the cuda backend: a row needs ", bytes,
                 " bytes of shared memory, the device has ", limit, " per block");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& query, const at::Tensor& keys,
                                                                  const at::Tensor& values,
                                                                  const std::optional<at::Tensor>& mask,
                                                                  const std::optional<at::Tensor>& v,
                                                                  bool return_weights) {
  check_attention_args(query, keys, values, mask, v);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = query.size(0), T = query.size(1), D = query.size(2), S = keys.size(1), Dv = values.size(2);
  const int64_t rows = B * T;
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), vals = values.contiguous();
  const at::Tensor m = mask ? mask->contiguous() : at::Tensor(), vv = v ? v->contiguous() : at::Tensor();
  const auto stats = query.options().dtype(attention_stats_dtype(query.scalar_type()));
  at::Tensor context = at::empty({B, T, Dv}, query.options());
  at::Tensor weights = at::empty({return_weights ? B : 0, T, S}, query.options());
  at::Tensor lse = at::empty({B, T}, stats);
  if (rows == 0) return {context, weights, lse};
  // Flash-decoding: too few rows to fill the SMs twice over -> slices of S in separate blocks.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t slices = 1;
  if (rows < 2 * sms && S > kMinSlice)
    slices = std::min((S + kMinSlice - 1) / kMinSlice, (2 * sms + rows - 1) / rows);
  const int64_t slice = std::max<int64_t>(1, (S + slices - 1) / slices);
  slices = std::max<int64_t>(1, (S + slice - 1) / slice);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Raw scores for the weights: written straight into the weights when they are already acc_t.
    at::Tensor scores;
    if (return_weights) scores = std::is_same_v<scalar_t, acc_t> ? weights : at::empty({B, T, S}, stats);
    at::Tensor part_max, part_sum, part_acc;
    if (slices > 1) {
      part_max = at::empty({rows, slices}, stats);
      part_sum = at::empty({rows, slices}, stats);
      part_acc = at::empty({rows, slices, Dv}, stats);
    }
    auto* fwd = attention_fwd_kernel<scalar_t, acc_t>;
    const size_t smem = (2 * D + kWarps * Dv + 2 * kWarps) * sizeof(acc_t);
    reserve_shared_memory(fwd, smem);
    fwd<<<dim3(rows, slices), kThreads, smem, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), vals.const_data_ptr<scalar_t>(),
        ptr_or_null<bool>(m), ptr_or_null<scalar_t>(vv), T, S, D, Dv, slice, context.data_ptr<scalar_t>(),
        lse.data_ptr<acc_t>(), return_weights ? scores.data_ptr<acc_t>() : nullptr,
        slices > 1 ? part_max.data_ptr<acc_t>() : nullptr, slices > 1 ? part_sum.data_ptr<acc_t>() : nullptr,
        slices > 1 ? part_acc.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (slices > 1) {
      attention_combine_kernel<scalar_t, acc_t><<<rows, 128, 0, stream>>>(
          part_max.const_data_ptr<acc_t>(), part_sum.const_data_ptr<acc_t>(), part_acc.const_data_ptr<acc_t>(),
          slices, Dv, context.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (return_weights && S > 0) {
      attention_weights_kernel<scalar_t, acc_t><<<rows, 128, 0, stream>>>(
          scores.const_data_ptr<acc_t>(), lse.const_data_ptr<acc_t>(), ptr_or_null<bool>(m), T, S,
          weights.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {context, weights, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_weights, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& v, const at::Tensor& lse) {
  check_attention_args(query, keys, values, mask, v);
  check_attention_bwd_args(grad_context, grad_weights, query, keys, values, lse);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = query.size(0), T = query.size(1), D = query.size(2), S = keys.size(1), Dv = values.size(2);
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), vals = values.contiguous(),
                   go = grad_context.contiguous(), ls = lse.contiguous();
  const at::Tensor m = mask ? mask->contiguous() : at::Tensor(), vv = v ? v->contiguous() : at::Tensor(),
                   gw = grad_weights ? grad_weights->contiguous() : at::Tensor();
  const auto stats = query.options().dtype(attention_stats_dtype(query.scalar_type()));
  at::Tensor grad_query = at::empty({B, T, D}, query.options());
  at::Tensor grad_keys = at::zeros({B, S, D}, stats);
  at::Tensor grad_values = at::zeros({B, S, Dv}, stats);
  at::Tensor grad_v = at::zeros({v ? D : 0}, stats);
  if (B * T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto* bwd = attention_bwd_kernel<scalar_t, acc_t>;
      const size_t smem = (4 * D + Dv + kWarps) * sizeof(acc_t);
      reserve_shared_memory(bwd, smem);
      bwd<<<B * T, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), vals.const_data_ptr<scalar_t>(),
          ptr_or_null<bool>(m), ptr_or_null<scalar_t>(vv), go.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gw),
          ls.const_data_ptr<acc_t>(), T, S, D, Dv, grad_query.data_ptr<scalar_t>(), grad_keys.data_ptr<acc_t>(),
          grad_values.data_ptr<acc_t>(), grad_v.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dtype = query.scalar_type();
  return {grad_query, grad_keys.to(dtype), grad_values.to(dtype), grad_v.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseq2seq, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace fastseq2seq
