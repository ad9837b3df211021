// The size rule of the persistent CUDA recurrence (csrc/cuda/lstm_layer_persistent.cu) and the shared-memory layout
// it implies. Plain C++ (no CUDA types) so that the rule is also an op that runs anywhere:
// fastseq2seq::lstm_layer_persistent_plan.
#pragma once
#include <ATen/ATen.h>
#include <algorithm>
#include <cstdint>
#include <optional>

#if defined(__CUDACC__)
#define FS2S_HOST_DEVICE __host__ __device__
#else
#define FS2S_HOST_DEVICE
#endif

namespace fastseq2seq {

constexpr int kPersistentThreads = 256;
constexpr int kPersistentWarps = kPersistentThreads / 32;
// The tensor-core tile (WMMA m16n16k16); also the granularity of slice rows, batch rows and K in the kernels.
constexpr int kPersistentTile = 16;
// (batch row, unit) pairs a thread carries through one chunk's elementwise math; bounds chunk * units.
constexpr int kPersistentPairsPerThread = 4;

FS2S_HOST_DEVICE constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// How one launch covers a layer. Block k owns hidden units [k*units, (k+1)*units) for every batch row and keeps the
// rows of its weight slice in shared memory for all steps. Forward: the 4*units rows of W_hh that feed its units
// (q-major, so a unit's four gates meet in one block), times h_{t-1} (K = H). Backward: the units' columns of W_hh
// (units rows of W_hh^T), times the previous step's gate gradients (K = 4H). The batch is staged `chunk` rows at a
// time.
struct PersistentPlan {
  int64_t units;   // hidden units per block
  int64_t rows;    // rows of the resident slice: 4 * units (forward) or units (backward); a multiple of 16 (tiles)
                   // with tensor cores, of 4 (one thread's group) with FMA
  int64_t blocks;  // ceil(H / units), at most one per SM: they must all be resident for the grid barrier
  int64_t chunk;   // batch rows per staged tile, a multiple of 16
  int64_t depth;   // K of the product rounded up to 16
  int64_t splits;  // the K range of each product tile is split this many ways when the tiles alone leave lanes idle
  int64_t ld;      // shared-memory row stride in elements: depth plus 16 bytes (no bank conflicts)
  int64_t smem;    // dynamic shared memory per block, bytes
};

// Byte offsets of the regions of dynamic shared memory, each 128-byte aligned: the weight slice [rows, ld] and the
// staged tile [chunk, ld] (element type), the partial products [splits, chunk, rows] and the per-unit state
// [batch, units] (accumulation type: the cell state, or its gradient, stays in float32 for half and bfloat16).
struct PersistentSmem {
  int64_t w, tile, partial, state, total;
};

FS2S_HOST_DEVICE inline PersistentSmem persistent_smem_layout(int64_t rows, int64_t chunk, int64_t splits, int64_t ld,
                                                              int64_t batch, int64_t units, int64_t element_size,
                                                              int64_t acc_size) {
  PersistentSmem s{};
  s.w = 0;
  s.tile = s.w + round_up(rows * ld * element_size, 128);
  s.partial = s.tile + round_up(chunk * ld * element_size, 128);
  s.state = s.partial + round_up(splits * chunk * rows * acc_size, 128);
  s.total = s.state + round_up(batch * units * acc_size, 128);
  return s;
}

// The size rule: whether the persistent kernel of one pass can run a layer of hidden size H over `batch` rows in
// `dtype` on a GPU with `sms` multiprocessors, `smem_per_block` bytes of opt-in shared memory per block and compute
// capability major `cc_major`, and how. units = ceil(H / sms) rounded up to a multiple of 4 (forward) or, backward,
// of 16 with tensor cores (16 rows per tile) and 4 without; the largest chunk (a multiple of 16, at most the batch
// rounded up to 16 and 1024 / units) whose layout fits `smem_per_block` wins; none fits: nullopt, and the per-step
// path runs. Needs sm_80+ (bfloat16 tensor cores, cooperative launch of large blocks).
inline std::optional<PersistentPlan> lstm_layer_persistent_plan(int64_t batch, int64_t hidden, at::ScalarType dtype,
                                                                int64_t sms, int64_t smem_per_block, int64_t cc_major,
                                                                bool backward) {
  if (batch <= 0 || hidden <= 0 || sms <= 0 || cc_major < 8) return std::nullopt;
  const bool tensor_cores = dtype == at::kHalf || dtype == at::kBFloat16;
  const int64_t element_size = at::elementSize(dtype);
  const int64_t acc_size = dtype == at::kDouble ? 8 : 4;
  const int64_t units = round_up((hidden + sms - 1) / sms, backward && tensor_cores ? kPersistentTile : 4);
  const int64_t rows = backward ? units : 4 * units;
  const int64_t depth = round_up(backward ? 4 * hidden : hidden, kPersistentTile);
  const int64_t ld = depth + 16 / element_size;
  const int64_t max_pairs = int64_t(kPersistentPairsPerThread) * kPersistentThreads;
  const int64_t largest =
      std::min(round_up(batch, kPersistentTile), max_pairs / units / kPersistentTile * kPersistentTile);
  for (int64_t chunk = largest; chunk >= kPersistentTile; chunk -= kPersistentTile) {
    // Independent pieces of one product: 16x16 tiles for the warps (tensor cores) or (batch row, 4 slice rows)
    // for the threads (FMA); K is split among idle lanes.
    const int64_t pieces = tensor_cores ? (rows / kPersistentTile) * (chunk / kPersistentTile) : rows / 4 * chunk;
    const int64_t lanes = tensor_cores ? kPersistentWarps : kPersistentThreads;
    const int64_t splits = std::clamp<int64_t>(lanes / pieces, 1, depth / kPersistentTile);
    const PersistentSmem layout =
        persistent_smem_layout(rows, chunk, splits, ld, batch, units, element_size, acc_size);
    if (layout.total <= smem_per_block) {
      return PersistentPlan{units, rows, (hidden + units - 1) / units, chunk, depth, splits, ld, layout.total};
    }
  }
  return std::nullopt;
}

// The persistent kernels, defined in cuda/lstm_layer_persistent.cu (CUDA builds only). Each runs its pass's loop
// with the contract of the per-step loop it replaces in cuda/lstm_layer.cu and returns true, or returns false and
// does nothing when the plan above finds no fit on the current GPU.
// Forward: fills gates/cells/output for every step and leaves the final state in h/c (c holds c0 on entry).
bool lstm_layer_persistent_fwd(at::Tensor& gates, at::Tensor& cells, at::Tensor& output, at::Tensor& h,
                               at::Tensor& c, const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                               bool reverse);
// Backward: fills grad_gates for every step (zero past each length), grad_gates_first (zeros on entry) and grad_cx
// (grad_c_n on entry) from the forward's saved gates and cells; all contiguous.
bool lstm_layer_persistent_bwd(const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& c0,
                               const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                               at::Tensor& grad_gates, at::Tensor& grad_gates_first, at::Tensor& grad_cx,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths, bool reverse);

}  // namespace fastseq2seq
