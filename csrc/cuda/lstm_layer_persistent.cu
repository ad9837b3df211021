// The persistent LSTM forward recurrence: one cooperative launch runs all T steps of a layer with W_hh resident in
// shared memory for the whole sequence, instead of one GEMM and one gate kernel per step that re-read W_hh from
// device memory. Block k owns hidden units [k*U, (k+1)*U): the 4U rows of W_hh that feed them (q-major, so a unit's
// four gates meet in one block and the gate math stays local) and their float32 cell state. Each step every block
// stages h_{t-1} from global memory, multiplies it with its slice (tensor cores for half/bfloat16 with float32
// accumulation, FMA for float32/float64), adds the precomputed input projection, runs the fused gate math
// (lstm_gates.cuh), writes its slice of h_t to a double buffer in global memory, and the grid synchronizes.
// The size rule that decides when this fits is lstm_layer_persistent_plan (csrc/lstm_layer_persistent.h).
// Not yet run on a GPU: selected only by FASTSEQ2SEQ_LSTM_RECURRENCE=persistent (see lstm_layer.cu).
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

// part[split][n][r] = sum over split's share of k of w_s[r][k] * h_s[n][k], for the 4U rows r of the block's W_hh
// slice and the chunk's rows n of h. Every (split, n, r) is written by exactly one lane, in a fixed order, so the
// result is deterministic.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void recurrent_product(const scalar_t* w_s, const scalar_t* h_s, acc_t* part, int rows,
                                                  int chunk, int ld, int ksteps, int splits) {
  using mma_t = typename TensorCoreType<scalar_t>::type;
  if constexpr (!std::is_void_v<mma_t>) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    namespace wmma = nvcuda::wmma;
    // One warp per (16x16 output tile, K split): A = W_hh slice rows (row-major), B = h^T (h rows, column-major).
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
      const mma_t* h_tile = reinterpret_cast<const mma_t*>(h_s) + n0 * ld;
      for (int ks = split * ksteps / splits; ks < (split + 1) * ksteps / splits; ++ks) {
        wmma::load_matrix_sync(a, w_tile + ks * kPersistentTile, ld);
        wmma::load_matrix_sync(b, h_tile + ks * kPersistentTile, ld);
        wmma::mma_sync(acc, a, b, acc);
      }
      // Column-major: part[split][n0 + n][m0 + m], the layout the gate math reads without bank conflicts.
      wmma::store_matrix_sync(part + (split * chunk + n0) * rows + m0, acc, rows, wmma::mem_col_major);
    }
#else
    __trap();  // lstm_layer_persistent_plan refuses GPUs before sm_80
#endif
  } else {
    // One thread per ((row n, unit u), K split): the four gates of unit u, 16 bytes of h and of each W row at a time.
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int units = rows / 4, pairs = units * chunk;
    for (int item = threadIdx.x; item < pairs * splits; item += kPersistentThreads) {
      const int pair = item % pairs, split = item / pairs;
      const int u = pair % units, n = pair / units;
      acc_t acc[4] = {0, 0, 0, 0};
      const int k_end = (split + 1) * ksteps / splits * kPersistentTile;
      for (int k = split * ksteps / splits * kPersistentTile; k < k_end; k += kVec) {
        const Vec16<scalar_t> hv = *reinterpret_cast<const Vec16<scalar_t>*>(h_s + n * ld + k);
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

// gates [T, B, 4H]: the input projections on entry, the activated gates on exit; cells, output [T, B, H]; h_n, c_n
// [B, H]: c_n holds c0 on entry, both hold the final state on exit; h_buf [2, B, round_up(H, 16)]: h0 in buffer 0,
// zero padding; w_hh [4H, H] contiguous. Rows past their length: zero outputs, state carried (as the per-step path).
template <typename scalar_t>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    lstm_layer_persistent_fwd_kernel(scalar_t* __restrict__ gates, scalar_t* __restrict__ cells,
                                     scalar_t* __restrict__ output, scalar_t* __restrict__ h_n,
                                     scalar_t* __restrict__ c_n, scalar_t* h_buf, const scalar_t* __restrict__ w_hh,
                                     const int64_t* __restrict__ lengths, int64_t T, int B, int H, bool reverse,
                                     PersistentPlan plan) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  extern __shared__ __align__(128) unsigned char smem[];
  const int U = plan.units, rows = 4 * U, chunk = plan.chunk, ld = plan.ld, splits = plan.splits;
  const int hk = round_up(H, kPersistentTile);
  const PersistentSmem layout =
      persistent_smem_layout(U, chunk, splits, ld, B, sizeof(scalar_t), sizeof(acc_t));
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem + layout.w);
  scalar_t* h_s = reinterpret_cast<scalar_t*>(smem + layout.h);
  acc_t* part = reinterpret_cast<acc_t*>(smem + layout.partial);
  acc_t* c_s = reinterpret_cast<acc_t*>(smem + layout.cell);
  const int tid = threadIdx.x, j0 = blockIdx.x * U;

  // The block's W_hh rows q*H + j0 + u at row q*U + u, zero past H (units and K alike): loaded once for all steps.
  for (int idx = tid; idx < rows * ld; idx += kPersistentThreads) {
    const int r = idx / ld, k = idx % ld, j = j0 + r % U;
    w_s[idx] = (j < H && k < H) ? w_hh[(int64_t(r / U) * H + j) * H + k] : scalar_t(0);
  }
  for (int idx = tid; idx < B * U; idx += kPersistentThreads) {
    const int j = j0 + idx % U;
    c_s[idx] = j < H ? static_cast<acc_t>(c_n[int64_t(idx / U) * H + j]) : acc_t(0);
  }

  cg::grid_group grid = cg::this_grid();
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    // Buffer s % 2 holds h_{t-1}; the other one was last read in step s - 1, before the grid barrier.
    const scalar_t* h_cur = h_buf + (s & 1) * int64_t(B) * hk;
    scalar_t* h_next = h_buf + ((s + 1) & 1) * int64_t(B) * hk;
    for (int b0 = 0; b0 < B; b0 += chunk) {
      // This thread's (row, unit) pairs p = tid + i * threads: their input projections and lengths, loaded before
      // the product so that their latency hides behind it.
      acc_t x_proj[kPersistentPairsPerThread][4];
      bool valid[kPersistentPairsPerThread];
#pragma unroll
      for (int i = 0; i < kPersistentPairsPerThread; ++i) {
        const int p = tid + i * kPersistentThreads, b = b0 + p / U, j = j0 + p % U;
        valid[i] = false;
        if (p < U * chunk && b < B && j < H) {
          const scalar_t* g = gates + (t * B + b) * 4 * H + j;
#pragma unroll
          for (int q = 0; q < 4; ++q) x_proj[i][q] = static_cast<acc_t>(g[q * H]);
          valid[i] = t < (lengths ? lengths[b] : T);
        }
      }
      __syncthreads();  // the previous chunk is done with h_s and part
      // Stage rows b0 .. b0 + chunk of h_{t-1}, zero past B. __ldcg reads L2: other blocks wrote it this launch.
      const int vecs = hk / kVec;
      for (int idx = tid; idx < chunk * vecs; idx += kPersistentThreads) {
        const int n = idx / vecs, v = idx % vecs;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (b0 + n < B) val = __ldcg(reinterpret_cast<const uint4*>(h_cur + int64_t(b0 + n) * hk) + v);
        *reinterpret_cast<uint4*>(h_s + n * ld + v * kVec) = val;
      }
      __syncthreads();
      recurrent_product<scalar_t, acc_t>(w_s, h_s, part, rows, chunk, ld, hk / kPersistentTile, splits);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kPersistentPairsPerThread; ++i) {
        const int p = tid + i * kPersistentThreads, n = p / U, u = p % U, b = b0 + n, j = j0 + u;
        if (p >= U * chunk || b >= B || j >= H) continue;
        acc_t gate[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          gate[q] = x_proj[i][q];
          for (int split = 0; split < splits; ++split) gate[q] += part[(split * chunk + n) * rows + q * U + u];
        }
        const int64_t row = t * B + b;
        scalar_t* g = gates + row * 4 * H + j;
        acc_t& c = c_s[b * U + u];
        scalar_t h_new = h_s[n * ld + j];  // past the end the state is carried over
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
        h_next[int64_t(b) * hk + j] = h_new;
        if (s == T - 1) {
          h_n[int64_t(b) * H + j] = h_new;
          c_n[int64_t(b) * H + j] = static_cast<scalar_t>(c);
        }
      }
    }
    if (s + 1 < T) grid.sync();  // h_t complete everywhere before any block stages it
  }
}

}  // namespace

bool lstm_layer_persistent_fwd(at::Tensor& gates, at::Tensor& cells, at::Tensor& output, at::Tensor& h,
                               at::Tensor& c, const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                               bool reverse) {
  const int64_t T = gates.size(0), B = gates.size(1), H = h.size(1);
  check_shape(gates, "gates", {T, B, 4 * H});
  check_shape(cells, "cells", {T, B, H});
  check_shape(output, "output", {T, B, H});
  check_shape(c, "c", {B, H});
  check_shape(w_hh, "w_hh", {4 * H, H});
  const auto check_buffer = [&](const at::Tensor& t, const char* name) {
    FS2S_CHECK_ARG(t.is_cuda() && t.is_contiguous(), name, "must be a contiguous CUDA tensor");
    check_like(t, name, gates, "gates");
  };
  check_buffer(gates, "gates");
  check_buffer(cells, "cells");
  check_buffer(output, "output");
  check_buffer(h, "h");
  check_buffer(c, "c");
  check_like(w_hh, "w_hh", gates, "gates");
  if (lengths) {
    check_shape(*lengths, "lengths", {B});
    FS2S_CHECK_ARG(lengths->is_contiguous() && lengths->scalar_type() == at::kLong, "lengths",
                   "must be a contiguous int64 tensor");
  }
  FS2S_CHECK_ARG(B <= std::numeric_limits<int>::max() && H <= std::numeric_limits<int>::max() / 4, "gates",
                 "batch and hidden sizes must fit 32-bit indexing, got ", gates.sizes());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (!prop->cooperativeLaunch) return false;
  const std::optional<PersistentPlan> plan = lstm_layer_persistent_plan(
      B, H, gates.scalar_type(), prop->multiProcessorCount, prop->sharedMemPerBlockOptin, prop->major);
  if (!plan) return false;

  const at::Tensor w = w_hh.contiguous();
  at::Tensor h_buf = at::zeros({2, B, round_up(H, kPersistentTile)}, h.options());
  h_buf[0].narrow(1, 0, H).copy_(h);
  const int64_t* plengths = lengths ? lengths->const_data_ptr<int64_t>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_layer_persistent_fwd", [&] {
    const auto kernel = &lstm_layer_persistent_fwd_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan->smem)));
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads, plan->smem));
    TORCH_CHECK(per_sm * prop->multiProcessorCount >= plan->blocks, "fastseq2seq: the persistent LSTM kernel needs ",
                plan->blocks, " resident blocks of ", plan->smem, " bytes of shared memory, the GPU holds ",
                per_sm * prop->multiProcessorCount);
    scalar_t* pgates = gates.data_ptr<scalar_t>();
    scalar_t* pcells = cells.data_ptr<scalar_t>();
    scalar_t* poutput = output.data_ptr<scalar_t>();
    scalar_t* ph = h.data_ptr<scalar_t>();
    scalar_t* pc = c.data_ptr<scalar_t>();
    scalar_t* ph_buf = h_buf.data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    int64_t steps = T;
    int batch = static_cast<int>(B), hidden = static_cast<int>(H);
    bool rev = reverse;
    PersistentPlan p = *plan;
    void* args[] = {&pgates, &pcells, &poutput, &ph, &pc, &ph_buf, &pw, &plengths, &steps, &batch, &hidden, &rev, &p};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(plan->blocks),
                                               dim3(kPersistentThreads), args, plan->smem, stream));
  });
  return true;
}

}  // namespace fastseq2seq
