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
// The tensor-core tile (WMMA m16n16k16); also the granularity of units, batch rows and K everywhere in the kernel.
constexpr int kPersistentTile = 16;
// (row, unit) pairs a thread carries through one batch chunk's gate math; bounds chunk * units.
constexpr int kPersistentPairsPerThread = 4;

FS2S_HOST_DEVICE constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// How one launch covers a layer: block k owns hidden units [k*units, (k+1)*units) (the 4*units rows of W_hh that
// feed them, q-major: all four gates of a unit in one block) and computes them for every batch row, `chunk` rows
// of h at a time.
struct PersistentPlan {
  int64_t units;   // hidden units per block, a multiple of 4 (4 * units rows = whole tensor-core tiles)
  int64_t blocks;  // ceil(H / units), at most one per SM: they must all be resident for the grid barrier
  int64_t chunk;   // batch rows per staged h tile, a multiple of 16
  int64_t splits;  // the K range of each product tile is split this many ways when the tiles alone leave warps idle
  int64_t ld;      // shared-memory row stride in elements: H rounded up to 16 plus 16 bytes (no bank conflicts)
  int64_t smem;    // dynamic shared memory per block, bytes
};

// Byte offsets of the regions of dynamic shared memory, each 128-byte aligned:
// W_hh slice [4U, ld], h tile [chunk, ld] (element type), partial products [splits, chunk, 4U] and the cell state
// [B, U] (accumulation type: the cell state stays in float32 for half and bfloat16 across all steps).
struct PersistentSmem {
  int64_t w, h, partial, cell, total;
};

FS2S_HOST_DEVICE inline PersistentSmem persistent_smem_layout(int64_t units, int64_t chunk, int64_t splits,
                                                              int64_t ld, int64_t batch, int64_t element_size,
                                                              int64_t acc_size) {
  PersistentSmem s{};
  s.w = 0;
  s.h = s.w + round_up(4 * units * ld * element_size, 128);
  s.partial = s.h + round_up(chunk * ld * element_size, 128);
  s.cell = s.partial + round_up(splits * chunk * 4 * units * acc_size, 128);
  s.total = s.cell + round_up(batch * units * acc_size, 128);
  return s;
}

// The size rule: whether the persistent kernel can run a layer of hidden size H over `batch` rows in `dtype` on a
// GPU with `sms` multiprocessors, `smem_per_block` bytes of opt-in shared memory per block and compute capability
// major `cc_major`, and how. units = ceil(H / sms) rounded up to 4; the largest chunk (a multiple of 16, at most
// the batch rounded up to 16 and 1024 / units) whose layout fits `smem_per_block` wins; none fits: nullopt, and
// the per-step path runs. Needs sm_80+ (bfloat16 tensor cores, cooperative launch of large blocks).
inline std::optional<PersistentPlan> lstm_layer_persistent_plan(int64_t batch, int64_t hidden, at::ScalarType dtype,
                                                                int64_t sms, int64_t smem_per_block,
                                                                int64_t cc_major) {
  if (batch <= 0 || hidden <= 0 || sms <= 0 || cc_major < 8) return std::nullopt;
  const bool tensor_cores = dtype == at::kHalf || dtype == at::kBFloat16;
  const int64_t element_size = at::elementSize(dtype);
  const int64_t acc_size = dtype == at::kDouble ? 8 : 4;
  const int64_t units = round_up((hidden + sms - 1) / sms, 4);
  const int64_t hk = round_up(hidden, kPersistentTile);
  const int64_t ld = hk + 16 / element_size;
  const int64_t max_pairs = int64_t(kPersistentPairsPerThread) * kPersistentThreads;
  const int64_t largest =
      std::min(round_up(batch, kPersistentTile), max_pairs / units / kPersistentTile * kPersistentTile);
  for (int64_t chunk = largest; chunk >= kPersistentTile; chunk -= kPersistentTile) {
    // Independent pieces of one product: 16x16 tiles for the warps (tensor cores) or (row, unit) pairs for the
    // threads (FMA); K is split among idle lanes.
    const int64_t pieces = tensor_cores ? (4 * units / kPersistentTile) * (chunk / kPersistentTile) : units * chunk;
    const int64_t lanes = tensor_cores ? kPersistentWarps : kPersistentThreads;
    const int64_t splits = std::clamp<int64_t>(lanes / pieces, 1, hk / kPersistentTile);
    const PersistentSmem layout = persistent_smem_layout(units, chunk, splits, ld, batch, element_size, acc_size);
    if (layout.total <= smem_per_block) {
      return PersistentPlan{units, (hidden + units - 1) / units, chunk, splits, ld, layout.total};
    }
  }
  return std::nullopt;
}

// Runs the forward recurrence of lstm_layer with the persistent kernel (contract of run_forward_recurrence in
// cuda/lstm_layer.cu) and returns true, or returns false and does nothing when the plan above finds no fit on the
// current GPU. Defined in cuda/lstm_layer_persistent.cu (CUDA builds only).
bool lstm_layer_persistent_fwd(at::Tensor& gates, at::Tensor& cells, at::Tensor& output, at::Tensor& h,
                               at::Tensor& c, const at::Tensor& w_hh, const std::optional<at::Tensor>& lengths,
                               bool reverse);

}  // namespace fastseq2seq
