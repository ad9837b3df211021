// The persistent LSTM recurrences: one cooperative launch runs all T steps of a layer's forward (or backward) with
// its weight slice resident in shared memory for the whole sequence, instead of a GEMM and an elementwise kernel per
// step that re-read W_hh from device memory. Block k owns hidden units [k*U, (k+1)*U) for every batch row.
// Forward: the 4U rows of W_hh that feed them (q-major, so a unit's four gates meet in one block and the gate math
// stays local) and their float32 cell state; each step it stages h_{t-1}, multiplies it with its slice, adds the
// precomputed input projection, runs the gate math (lstm_gates.cuh) and writes its part of h_t to a double buffer.
// Backward: the U columns of W_hh and the float32 gradient of the units' cell state; each step it stages the previous
// step's gate gradients, multiplies them with its slice (dh = dgates W_hh), runs the elementwise backward and writes
// its part of this step's gate gradients. The grid synchronizes after every step. Products: tensor cores (WMMA,
// float32 accumulation) for half/bfloat16, FMA for float32/float64. The size rule is lstm_layer_persistent_plan
// (csrc/lstm_layer_persistent.h). Not yet run on a GPU: selected only by FASTSEQ2SEQ_LSTM_RECURRENCE=persistent.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <limits>
#include <type_traits>

#include "checks.h"
#include "cuda/lstm_gates.cuh"
#include "lstm_layer.h"
#include "lstm_layer_persistent.h"

namespace fastseq2seq {
namespace {

namespace cg = cooperative_groups;

// The CUDA type the tensor cores take for a 16-bit scalar_t; void: the FMA path.
template <typename scalar_t>
struct TensorCoreType {
  using type = void;
};
template <>
struct TensorCoreType<at::Half> {
  using type = __half;
};
template <>
struct TensorCoreType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// 16 bytes of elements: one vector load from shared memory.
template <typename scalar_t>
struct alignas(16) Vec16 {
  scalar_t v[16 / sizeof(scalar_t)];
};

// part[split][n][r] = sum over split's share of k of w_s[r][k] * tile[n][k], for the rows r of the block's weight
// slice and the rows n of the staged chunk. Every (split, n, r) is written by exactly one lane, in a fixed order, so
// the result is deterministic.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void recurrent_product(const scalar_t* w_s, const scalar_t* tile, acc_t* part, int rows,
                                                  int chunk, int ld, int ksteps, int splits) {
  using mma_t = typename TensorCoreType<scalar_t>::type;
  if constexpr (!std::is_void_v<mma_t>) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    namespace wmma = nvcuda::wmma;
    // One warp per (16x16 output tile, K split): A = slice rows (row-major), B = tile^T (tile rows, column-major).
    const int warp = threadIdx.x / 32;
    const int n_tiles = chunk / kPersistentTile;
    const int items = (rows / kPersistentTile) * n_tiles * splits;
    for (int item = warp; item < items; item += kPersistentWarps) {
      const int tile = item / splits, split = item % splits;
      const int m0 = tile / n_tiles * kPersistentTile, n0 = tile % n_tiles * kPersistentTile;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::col_major> b;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      const mma_t* w_tile = reinterpret_cast<const mma_t*>(w_s) + m0 * ld;
      const mma_t* t_tile = reinterpret_cast<const mma_t*>(tile) + n0 * ld;
      for (int ks = split * ksteps / splits; ks < (split + 1) * ksteps / splits; ++ks) {
        wmma::load_matrix_sync(a, w_tile + ks * kPersistentTile, ld);
        wmma::load_matrix_sync(b, t_tile + ks * kPersistentTile, ld);
        wmma::mma_sync(acc, a, b, acc);
      }
      // Column-major: part[split][n0 + n][m0 + m], the layout the elementwise math reads without bank conflicts.
      wmma::store_matrix_sync(part + (split * chunk + n0) * rows + m0, acc, rows, wmma::mem_col_major);
    }
#else
    __trap();  // lstm_layer_persistent_plan refuses GPUs before sm_80
#endif
  } else {
    // One thread per ((row n, group u), K split): slice rows q * rows/4 + u (forward: the four gates of unit u),
    // 16 bytes of the tile row and of each slice row at a time.
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int units = rows / 4, pairs = units * chunk;
    for (int item = threadIdx.x; item < pairs * splits; item += kPersistentThreads) {
      const int pair = item % pairs, split = item / pairs;
      const int u = pair % units, n = pair / units;
      acc_t acc[4] = {0, 0, 0, 0};
      const int k_end = (split + 1) * ksteps / splits * kPersistentTile;
      for (int k = split * ksteps / splits * kPersistentTile; k < k_end; k += kVec) {
        const Vec16<scalar_t> hv = *reinterpret_cast<const Vec16<scalar_t>*>(tile + n * ld + k);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const Vec16<scalar_t> wv = *reinterpret_cast<const Vec16<scalar_t>*>(w_s + (q * units + u) * ld + k);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[q] += static_cast<acc_t>(wv.v[e]) * static_cast<acc_t>(hv.v[e]);
        }
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) part[(split * chunk + n) * rows + q * units + u] = acc[q];
    }
  }
}

// The block's shared memory, carved as persistent_smem_layout says.
template <typename scalar_t>
struct PersistentShared {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* w;     // the resident weight slice [rows, ld]
  scalar_t* tile;  // the staged chunk of h (forward) or of the previous step's gate gradients (backward) [chunk, ld]
  acc_t* part;     // partial products [splits, chunk, rows]
  acc_t* state;    // the units' cell state (forward) or its gradient (backward) [B, units]

  __device__ PersistentShared(const PersistentPlan& plan, int B) {
    extern __shared__ __align__(128) unsigned char smem[];
    const PersistentSmem layout = persistent_smem_layout(plan.rows, plan.chunk, plan.splits, plan.ld, B, plan.units,
                                                         sizeof(scalar_t), sizeof(acc_t));
    w = reinterpret_cast<scalar_t*>(smem + layout.w);
    tile = reinterpret_cast<scalar_t*>(smem + layout.tile);
    part = reinterpret_cast<acc_t*>(smem + layout.partial);
    state = reinterpret_cast<acc_t*>(smem + layout.state);
  }
};

// Copies rows b0 .. b0 + chunk of src [B, depth] (row stride depth, a multiple of 16 elements) into tile [chunk, ld],
// zero past B. __ldcg reads through L2: other blocks wrote src during this launch.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(scalar_t* tile, const scalar_t* src, int b0, int chunk, int B, int depth,
                                           int ld) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int vecs = depth / kVec;
  for (int idx = threadIdx.x; idx < chunk * vecs; idx += kPersistentThreads) {
    const int n = idx / vecs, v = idx % vecs;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (b0 + n < B) val = __ldcg(reinterpret_cast<const uint4*>(src + int64_t(b0 + n) * depth) + v);
    *reinterpret_cast<uint4*>(tile + n * ld + v * kVec) = val;
  }
}

// Buffer s % 2 of a double buffer [2, B, depth] in global memory.
template <typename scalar_t>
__device__ __forceinline__ scalar_t* step_buffer(scalar_t* buf, int64_t s, int B, const PersistentPlan& plan) {
  return buf + (s & 1) * int64_t(B) * plan.depth;
}

// Stages rows b0 .. b0 + chunk of src (h_{t-1} or the previous step's gate gradients, [B, depth]) and multiplies
// them with the block's slice into sh.part. Every thread of the block calls it.
template <typename scalar_t>
__device__ __forceinline__ void chunk_product(const PersistentShared<scalar_t>& sh, const scalar_t* src, int b0,
                                              int B, const PersistentPlan& plan) {
  __syncthreads();  // the previous chunk is done with the tile and the partial products
  stage_rows(sh.tile, src, b0, plan.chunk, B, plan.depth, plan.ld);
  __syncthreads();
  recurrent_product(sh.w, sh.tile, sh.part, plan.rows, plan.chunk, plan.ld, plan.depth / kPersistentTile,
                    plan.splits);
  __syncthreads();
}

// The i-th (batch row, unit) pair of this thread in the chunk at b0: p = tid + i * threads, unit fastest so that
// neighbouring threads touch neighbouring elements of a row.
struct ChunkPair {
  int n, u, b, j;  // row in the chunk, unit in the block, batch row, hidden unit
  bool active;     // inside the chunk, the batch and H

  __device__ ChunkPair(int i, int b0, int j0, const PersistentPlan& plan, int B, int H) {
    const int p = threadIdx.x + i * kPersistentThreads, U = plan.units;
    n = p / U;
    u = p % U;
    b = b0 + n;
    j = j0 + u;
    active = p < U * plan.chunk && b < B && j < H;
  }
};

// gates [T, B, 4H]: the input projections on entry, the activated gates on exit; cells, output [T, B, H]; h_n, c_n
// [B, H]: c_n holds c0 on entry, both hold the final state on exit; h_buf [2, B, depth]: h0 in buffer 0, zero
// padding; w_hh [4H, H] contiguous. Rows past their length: zero outputs, state carried (as the per-step path).
template <typename scalar_t>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    lstm_layer_persistent_fwd_kernel(scalar_t* __restrict__ gates, scalar_t* __restrict__ cells,
                                     scalar_t* __restrict__ output, scalar_t* __restrict__ h_n,
                                     scalar_t* __restrict__ c_n, scalar_t* h_buf, const scalar_t* __restrict__ w_hh,
                                     const int64_t* __restrict__ lengths, int64_t T, int B, int H, bool reverse,
                                     PersistentPlan plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const PersistentShared<scalar_t> sh(plan, B);
  const int U = plan.units, chunk = plan.chunk, ld = plan.ld, j0 = blockIdx.x * U;
  // The block's W_hh rows q*H + j0 + u at row q*U + u, zero past H (units and K alike): loaded once for all steps.
  for (int idx = threadIdx.x; idx < plan.rows * ld; idx += kPersistentThreads) {
    const int r = idx / ld, k = idx % ld, j = j0 + r % U;
    sh.w[idx] = (j < H && k < H) ? w_hh[(int64_t(r / U) * H + j) * H + k] : scalar_t(0);
  }
  for (int idx = threadIdx.x; idx < B * U; idx += kPersistentThreads) {
    const int j = j0 + idx % U;
    sh.state[idx] = j < H ? static_cast<acc_t>(c_n[int64_t(idx / U) * H + j]) : acc_t(0);
  }

  cg::grid_group grid = cg::this_grid();
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    // Buffer s % 2 holds h_{t-1}; the other one was last read in step s - 1, before the grid barrier.
    const scalar_t* h_cur = step_buffer(h_buf, s, B, plan);
    scalar_t* h_next = step_buffer(h_buf, s + 1, B, plan);
    for (int b0 = 0; b0 < B; b0 += chunk) {
      // This thread's (row, unit) pairs p = tid + i * threads: their input projections and lengths, loaded before
      // the product so that their latency hides behind it.
      acc_t x_proj[kPersistentPairsPerThread][4];
      bool valid[kPersistentPairsPerThread];
#pragma unroll
      for (int i = 0; i < kPersistentPairsPerThread; ++i) {
        const ChunkPair pair(i, b0, j0, plan, B, H);
        valid[i] = false;
        if (!pair.active) continue;
        const scalar_t* g = gates + (t * B + pair.b) * 4 * H + pair.j;
#pragma unroll
        for (int q = 0; q < 4; ++q) x_proj[i][q] = static_cast<acc_t>(g[q * H]);
        valid[i] = t < (lengths ? lengths[pair.b] : T);
      }
      chunk_product(sh, h_cur, b0, B, plan);
#pragma unroll
      for (int i = 0; i < kPersistentPairsPerThread; ++i) {
        const ChunkPair pair(i, b0, j0, plan, B, H);
        if (!pair.active) continue;
        const int n = pair.n, u = pair.u, b = pair.b, j = pair.j;
        acc_t gate[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          gate[q] = x_proj[i][q];
          for (int split = 0; split < plan.splits; ++split) {
            gate[q] += sh.part[(split * chunk + n) * plan.rows + q * U + u];
          }
        }
        const int64_t row = t * B + b;
        scalar_t* g = gates + row * 4 * H + j;
        acc_t& c = sh.state[b * U + u];
        scalar_t h_new = sh.tile[n * ld + j];  // past the end the state is carried over
        if (valid[i]) {
          acc_t h_val;
          c = lstm_gates_fwd(gate, c, &h_val);
          h_new = static_cast<scalar_t>(h_val);
#pragma unroll
          for (int q = 0; q < 4; ++q) g[q * H] = static_cast<scalar_t>(gate[q]);
          cells[row * H + j] = static_cast<scalar_t>(c);
          output[row * H + j] = h_new;
        } else {  // zero output and saved buffers, as the per-step path
#pragma unroll
          for (int q = 0; q < 4; ++q) g[q * H] = scalar_t(0);
          cells[row * H + j] = output[row * H + j] = scalar_t(0);
        }
        h_next[int64_t(b) * plan.depth + j] = h_new;
        if (s == T - 1) {
          h_n[int64_t(b) * H + j] = h_new;
          c_n[int64_t(b) * H + j] = static_cast<scalar_t>(c);
        }
      }
    }
    if (s + 1 < T) grid.sync();  // h_t complete everywhere before any block stages it
  }
}

// Backpropagation through time, the forward's steps last first. gates, cells: what the forward saved; c0, grad_h_n,
// grad_c_n [B, H]; grad_output [T, B, H]; grad_gates [T, B, 4H] (out, zero past each length); grad_gates_first
// [B, 4H] (zeros on entry: each row's gate gradients at the step that consumed (h0, c0)); grad_cx [B, H] (grad_c_n
// on entry, so rows of length 0 pass it through); dg_buf [2, B, depth] zeros: the gate gradients of the step just
// done, which the next step multiplies by W_hh. The block owns the columns of W_hh of its units and the float32
// gradient of their cell state.
template <typename scalar_t>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    lstm_layer_persistent_bwd_kernel(const scalar_t* __restrict__ gates, const scalar_t* __restrict__ cells,
                                     const scalar_t* __restrict__ c0, const scalar_t* __restrict__ grad_output,
                                     const scalar_t* __restrict__ grad_h_n, const scalar_t* __restrict__ grad_c_n,
                                     scalar_t* __restrict__ grad_gates, scalar_t* __restrict__ grad_gates_first,
                                     scalar_t* __restrict__ grad_cx, scalar_t* dg_buf,
                                     const scalar_t* __restrict__ w_hh, const int64_t* __restrict__ lengths, int64_t T,
                                     int B, int H, bool reverse, PersistentPlan plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const PersistentShared<scalar_t> sh(plan, B);
  const int U = plan.units, chunk = plan.chunk, ld = plan.ld, j0 = blockIdx.x * U;
  // Row u of the slice is column j0 + u of W_hh (k = the 4H gate rows), zero past H and 4H; u varies fastest so
  // that the reads of W_hh's rows coalesce.
  for (int idx = threadIdx.x; idx < plan.rows * ld; idx += kPersistentThreads) {
    const int k = idx / U, u = idx % U, j = j0 + u;
    sh.w[u * ld + k] = (j < H && k < 4 * H) ? w_hh[int64_t(k) * H + j] : scalar_t(0);
  }

  cg::grid_group grid = cg::this_grid();
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? s : T - 1 - s;
    const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step before t in the forward's order
    // Buffer s % 2 holds the gate gradients of step s - 1 (zeros at s = 0, where every valid row takes grad_h_n).
    const scalar_t* dg_cur = step_buffer(dg_buf, s, B, plan);
    scalar_t* dg_next = step_buffer(dg_buf, s + 1, B, plan);
    for (int b0 = 0; b0 < B; b0 += chunk) {
      // This thread's (row, unit) pairs: what the forward saved and the incoming gradients, loaded before the
      // product so that their latency hides behind it.
      acc_t gate[kPersistentPairsPerThread][4], c_t[kPersistentPairsPerThread], c_prev[kPersistentPairsPerThread];
      acc_t dh_in[kPersistentPairsPerThread], dc_in[kPersistentPairsPerThread];
      bool valid[kPersistentPairsPerThread], at_first[kPersistentPairsPerThread], at_last[kPersistentPairsPerThread];
#pragma unroll
      for (int i = 0; i < kPersistentPairsPerThread; ++i) {
        const ChunkPair pair(i, b0, j0, plan, B, H);
        const int b = pair.b, j = pair.j;
        valid[i] = at_first[i] = at_last[i] = false;
        dc_in[i] = acc_t(0);
        if (!pair.active) continue;
        const int64_t length = lengths ? lengths[b] : T;
        valid[i] = t < length;
        if (!valid[i]) continue;
        const SequenceSteps steps = sequence_steps(length, reverse);
        at_first[i] = t == steps.first;
        at_last[i] = t == steps.last;
        const int64_t row = t * B + b;
#pragma unroll
        for (int q = 0; q < 4; ++q) gate[i][q] = static_cast<acc_t>(gates[row * 4 * H + q * H + j]);
        c_t[i] = static_cast<acc_t>(cells[row * H + j]);
        c_prev[i] = static_cast<acc_t>(at_first[i] ? c0[int64_t(b) * H + j] : cells[(t_prev * B + b) * H + j]);
        dh_in[i] = static_cast<acc_t>(grad_output[row * H + j]);
        if (at_last[i]) {
          dh_in[i] += static_cast<acc_t>(grad_h_n[int64_t(b) * H + j]);
          dc_in[i] = static_cast<acc_t>(grad_c_n[int64_t(b) * H + j]);
        }
      }
      chunk_product(sh, dg_cur, b0, B, plan);
#pragma unroll
      for (int i = 0; i < kPersistentPairsPerThread; ++i) {
        const ChunkPair pair(i, b0, j0, plan, B, H);
        if (!pair.active) continue;
        const int n = pair.n, u = pair.u, b = pair.b, j = pair.j;
        scalar_t* dg = grad_gates + (t * B + b) * 4 * H + j;
        scalar_t* dg_row = dg_next + int64_t(b) * plan.depth + j;
        if (!valid[i]) {  // zero gate gradients past the end, as the per-step path
#pragma unroll
          for (int q = 0; q < 4; ++q) dg[q * H] = dg_row[q * H] = scalar_t(0);
          continue;
        }
        // dL/dh_t: the output's gradient plus grad_h_n at the last step, else dgates_{t+1} W_hh from the product.
        acc_t dh = dh_in[i];
        if (!at_last[i]) {
          for (int split = 0; split < plan.splits; ++split) dh += sh.part[(split * chunk + n) * plan.rows + u];
        }
        acc_t& dc_state = sh.state[b * U + u];
        acc_t d_gate[4];
        const acc_t d_c_prev = lstm_gates_bwd(gate[i], c_t[i], c_prev[i], dh, at_last[i] ? dc_in[i] : dc_state,
                                              d_gate);
        scalar_t d_gate_out[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) dg[q * H] = dg_row[q * H] = d_gate_out[q] = static_cast<scalar_t>(d_gate[q]);
        if (at_first[i]) {
          grad_cx[int64_t(b) * H + j] = static_cast<scalar_t>(d_c_prev);
#pragma unroll
          for (int q = 0; q < 4; ++q) grad_gates_first[int64_t(b) * 4 * H + q * H + j] = d_gate_out[q];
        } else {
          dc_state = d_c_prev;
        }
      }
    }
    if (s + 1 < T) grid.sync();  // the step's gate gradients complete everywhere before any block stages them
  }
}

}  // namespace

namespace {

// The plan for this pass on the current GPU, or nullopt (also without cooperative launch).
std::optional<PersistentPlan> plan_here(int64_t B, int64_t H, at::ScalarType dtype, bool backward) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch) return std::nullopt;
  return lstm_layer_persistent_plan(B, H, dtype, prop->multiProcessorCount, prop->sharedMemPerBlockOptin,
                                    prop->major, backward);
}

// One cooperative launch of `kernel(args...)` as `plan` says: every block resident at once, as grid.sync() requires.
template <typename... Params>
void launch_cooperative(void (*kernel)(Params...), const PersistentPlan& plan, std::type_identity_t<Params>... args) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads, plan.smem));
  TORCH_CHECK(per_sm * prop->multiProcessorCount >= plan.blocks, "fastseq2seq: the persistent LSTM kernel needs ",
              plan.blocks, " resident blocks of ", plan.smem, " bytes of shared memory, the GPU holds ",
              per_sm * prop->multiProcessorCount);
  void* arg_ptrs[] = {static_cast<void*>(&args)...};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(plan.blocks),
                                             dim3(kPersistentThreads), arg_ptrs, plan.smem,
                                             at::cuda::getCurrentCUDAStream()));
}

// A buffer of the given shape, contiguous, on the device and in the dtype of ref.
void check_buffer(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                  at::IntArrayRef shape) {
  check_shape(t, name, shape);
  FS2S_CHECK_ARG(t.is_cuda() && t.is_contiguous(), name, "must be a contiguous CUDA tensor");
  check_like(t, name, ref, ref_name);
}

// The checks both launchers share (gates [T, B, 4H] leads), then the pass's plan on this GPU: nullopt when it does
// not fit, or for T = 0.
std::optional<PersistentPlan> checked_plan(const at::Tensor& gates, const at::Tensor& w_hh,
                                           const std::optional<at::Tensor>& lengths, int64_t H, bool backward) {
  const int64_t T = gates.size(0), B = gates.size(1);
  check_buffer(gates, "gates", gates, "gates", {T, B, 4 * H});
  check_shape(w_hh, "w_hh", {4 * H, H});
  check_like(w_hh, "w_hh", gates, "gates");
  if (lengths) {
    check_shape(*lengths, "lengths", {B});
    FS2S_CHECK_ARG(lengths->is_cuda() && lengths->is_contiguous() && lengths->scalar_type() == at::kLong, "lengths",
                   "must be a contiguous int64 CUDA tensor");
  }
  FS2S_CHECK_ARG(B <= std::numeric_limits<int>::max() && H <= std::numeric_limits<int>::max() / 4, "w_hh",
                 "batch and hidden sizes must fit 32-bit indexing, got B = ", B, ", H = ", H);
  return T > 0 ? plan_here(B, H, gates.scalar_type(), backward) : std::nullopt;
}

}  // namespace

bool lstm_layer_persistent_fwd(at::Tensor& gates, at::Tensor& cells, at::Tensor& output, at::Tensor& h,
                               at::Tensor& c, const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                               bool reverse) {
  const int64_t T = gates.size(0), B = gates.size(1), H = h.size(1);
  check_buffer(cells, "cells", gates, "gates", {T, B, H});
  check_buffer(output, "output", gates, "gates", {T, B, H});
  check_buffer(h, "h", gates, "gates", {B, H});
  check_buffer(c, "c", gates, "gates", {B, H});
  const std::optional<PersistentPlan> plan = checked_plan(gates, w_hh, lengths, H, /*backward=*/false);
  if (!plan) return false;

  const at::Tensor w = w_hh.contiguous();
  at::Tensor h_buf = at::zeros({2, B, plan->depth}, h.options());
  h_buf[0].narrow(1, 0, H).copy_(h);
  const int64_t* plengths = lengths ? lengths->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_layer_persistent_fwd", [&] {
    launch_cooperative(&lstm_layer_persistent_fwd_kernel<scalar_t>, *plan, gates.data_ptr<scalar_t>(),
                       cells.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                       c.data_ptr<scalar_t>(), h_buf.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), plengths, T,
                       int(B), int(H), reverse, *plan);
  });
  return true;
}

bool lstm_layer_persistent_bwd(const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& c0,
                               const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                               at::Tensor& grad_gates, at::Tensor& grad_gates_first, at::Tensor& grad_cx,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths, bool reverse) {
  const int64_t T = gates.size(0), B = gates.size(1), H = c0.size(1);
  check_buffer(cells, "cells", gates, "gates", {T, B, H});
  check_buffer(c0, "c0", gates, "gates", {B, H});
  check_buffer(grad_output, "grad_output", gates, "gates", {T, B, H});
  check_buffer(grad_h_n, "grad_h_n", gates, "gates", {B, H});
  check_buffer(grad_c_n, "grad_c_n", gates, "gates", {B, H});
  check_buffer(grad_gates, "grad_gates", gates, "gates", {T, B, 4 * H});
  check_buffer(grad_gates_first, "grad_gates_first", gates, "gates", {B, 4 * H});
  check_buffer(grad_cx, "grad_cx", gates, "gates", {B, H});
  const std::optional<PersistentPlan> plan = checked_plan(gates, w_hh, lengths, H, /*backward=*/true);
  if (!plan) return false;

  const at::Tensor w = w_hh.contiguous();
  at::Tensor dg_buf = at::zeros({2, B, plan->depth}, gates.options());
  const int64_t* plengths = lengths ? lengths->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_layer_persistent_bwd", [&] {
    launch_cooperative(&lstm_layer_persistent_bwd_kernel<scalar_t>, *plan, gates.const_data_ptr<scalar_t>(),
                       cells.const_data_ptr<scalar_t>(), c0.const_data_ptr<scalar_t>(),
                       grad_output.const_data_ptr<scalar_t>(), grad_h_n.const_data_ptr<scalar_t>(),
                       grad_c_n.const_data_ptr<scalar_t>(), grad_gates.data_ptr<scalar_t>(),
                       grad_gates_first.data_ptr<scalar_t>(), grad_cx.data_ptr<scalar_t>(),
                       dg_buf.data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), plengths, T, int(B), int(H), reverse,
                       *plan);
  });
  return true;
}

}  // namespace fastseq2seq
