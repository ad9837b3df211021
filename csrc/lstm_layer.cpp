// LSTM layer op schemas and the CPU kernels: the whole recurrence of one direction inside one op.
//
// Forward: the input projections of all steps are one GEMM into `gates` [T, B, 4H] before the loop; each step adds
// h_{t-1} W_hh^T into its slice of that buffer (one GEMM) and runs the fused gate math per batch row, leaving the
// activated gates and the cell state in place for the backward. Backward: backpropagation through time with one
// GEMM (dgates_t W_hh) and the fused elementwise backward per step, then dx, dW_ih, dW_hh and db as a few large
// GEMMs over all steps. No tensor is allocated inside either loop.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

#include "lstm_cell.h"
#include "lstm_layer.h"
#include "lstm_layer_persistent.h"

#if AT_MKL_ENABLED() && defined(__linux__)
#include <dlfcn.h>
#define FS2S_MKL_PACKED_GEMM
#endif

namespace fastseq2seq {
namespace {

#ifdef FS2S_MKL_PACKED_GEMM
// MKL's packed GEMM (LP64: int sizes, enums as ints), looked up in the libtorch_cpu already loaded rather than
// linked, so that a torch whose MKL symbols are not exported still loads this extension (and uses at::addmm).
struct MklPackedGemm {
  size_t (*get_size)(int identifier, int m, int n, int k);
  void (*pack)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
               float* dest);
  void (*compute)(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda, const float* b,
                  int ldb, float beta, float* c, int ldc);
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
};

const MklPackedGemm* mkl_packed_gemm() {
  static const MklPackedGemm api = [] {
    MklPackedGemm found{};
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
      found.get_size = reinterpret_cast<decltype(found.get_size)>(dlsym(lib, "cblas_sgemm_pack_get_size"));
      found.pack = reinterpret_cast<decltype(found.pack)>(dlsym(lib, "cblas_sgemm_pack"));
      found.compute = reinterpret_cast<decltype(found.compute)>(dlsym(lib, "cblas_sgemm_compute"));
    }
    return found;
  }();
  return api.get_size && api.pack && api.compute ? &api : nullptr;
}
#endif

// out = a @ weight (+ out) for the T same-shaped recurrent products of one call. The weight is the same every
// step: in float32 with MKL it is packed once into MKL's internal layout, which sgemm would otherwise redo on every
// call; else each step is one at::addmm_out / at::mm_out into the preallocated buffer.
class RecurrentGemm {
 public:
  // weight: [K, N], a row-major matrix or the transpose of one.
  RecurrentGemm(const at::Tensor& weight, int64_t M) : weight_(weight), M_(M) {
#ifdef FS2S_MKL_PACKED_GEMM
    const int64_t K = weight.size(0), N = weight.size(1);
    const bool row_major = weight.stride(1) == 1 && weight.stride(0) == N;
    const bool transposed = weight.stride(0) == 1 && weight.stride(1) == K;
    const int64_t limit = std::numeric_limits<int>::max();
    mkl_ = weight.scalar_type() == at::kFloat && (row_major || transposed) && M > 0 && M * K <= limit &&
                   K * N <= limit && M * N <= limit
               ? mkl_packed_gemm()
               : nullptr;
    if (mkl_) {
      packed_ = at::empty({static_cast<int64_t>(mkl_->get_size(MklPackedGemm::kBMatrix, M, N, K))},
                          weight.options().dtype(at::kByte));
      mkl_->pack(MklPackedGemm::kRowMajor, MklPackedGemm::kBMatrix,
                 row_major ? MklPackedGemm::kNoTrans : MklPackedGemm::kTrans, M, N, K, 1.0f,
                 weight.const_data_ptr<float>(), row_major ? N : K, static_cast<float*>(packed_.data_ptr()));
    }
#endif
  }

  // a [M, K] and out [M, N], both contiguous.
  void run(const at::Tensor& a, at::Tensor& out, bool accumulate) const {
#ifdef FS2S_MKL_PACKED_GEMM
    if (mkl_) {
      const int K = weight_.size(0), N = weight_.size(1);
      mkl_->compute(MklPackedGemm::kRowMajor, MklPackedGemm::kNoTrans, MklPackedGemm::kPacked, M_, N, K,
                    a.const_data_ptr<float>(), K, static_cast<const float*>(packed_.const_data_ptr()), N,
                    accumulate ? 1.0f : 0.0f, out.data_ptr<float>(), N);
      return;
    }
#endif
    if (accumulate) {
      at::addmm_out(out, out, a, weight_);
    } else {
      at::mm_out(out, a, weight_);
    }
  }

 private:
  at::Tensor weight_, packed_;
  int64_t M_;
#ifdef FS2S_MKL_PACKED_GEMM
  const MklPackedGemm* mkl_ = nullptr;
#endif
};

// Rows per task: enough work per thread to amortize the fork.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * H)); }

// lengths, or T for every row when none are given.
std::vector<int64_t> row_lengths(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  if (!lengths) return std::vector<int64_t>(B, T);
  const at::Tensor l = lengths->contiguous();
  const int64_t* p = l.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + B);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& lengths, bool reverse) {
  check_lstm_layer_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh, lengths);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2), H = hx.size(1);
  at::Tensor gates = at::empty({T, B, 4 * H}, input.options());
  at::Tensor cells = at::empty({T, B, H}, input.options());
  at::Tensor output = at::empty({T, B, H}, input.options());
  at::Tensor h_n = hx.contiguous().clone();  // the running state: rows stop changing after their last step
  at::Tensor c_n = cx.contiguous().clone();
  if (T * B == 0) return {output, h_n, c_n, gates, cells};
  at::Tensor gates_2d = gates.view({T * B, 4 * H});
  const at::Tensor input_2d = input.reshape({T * B, I});
  if (b_ih) {
    at::addmm_out(gates_2d, *b_ih + *b_hh, input_2d, w_ih.t());
  } else {
    at::mm_out(gates_2d, input_2d, w_ih.t());
  }
  const RecurrentGemm recurrent(w_hh.t(), B);
  const std::vector<int64_t> length = row_lengths(lengths, T, B);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_fwd_cpu", [&] {
    scalar_t* pg = gates.data_ptr<scalar_t>();
    scalar_t* pc = cells.data_ptr<scalar_t>();
    scalar_t* pout = output.data_ptr<scalar_t>();
    scalar_t* ph = h_n.data_ptr<scalar_t>();
    scalar_t* pcn = c_n.data_ptr<scalar_t>();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      at::Tensor gates_t = gates_2d.narrow(0, t * B, B);
      recurrent.run(h_n, gates_t, /*accumulate=*/true);
      at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t row = t * B + b;
          scalar_t* g = pg + row * 4 * H;
          scalar_t* c = pc + row * H;
          scalar_t* h = pout + row * H;
          if (t >= length[b]) {  // past the end: zero output, and deterministic saved buffers
            std::memset(g, 0, 4 * H * sizeof(scalar_t));
            std::memset(c, 0, H * sizeof(scalar_t));
            std::memset(h, 0, H * sizeof(scalar_t));
            continue;
          }
          lstm_cell_fwd_row<scalar_t>(g, nullptr, nullptr, pcn + b * H, c, h, H);  // biases are in the projection
          std::memcpy(ph + b * H, h, H * sizeof(scalar_t));
          std::memcpy(pcn + b * H, c, H * sizeof(scalar_t));
        }
      });
    }
  });
  return {output, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& lengths, bool reverse, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells) {
  check_lstm_layer_bwd_args(grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, lengths, output, gates,
                            cells);
  const int64_t T = input.size(0), B = input.size(1), H = hx.size(1);
  const at::Tensor go = grad_output.contiguous(), ghn = grad_h_n.contiguous(), gcn = grad_c_n.contiguous(),
                   gt = gates.contiguous(), cc = cells.contiguous(), c0 = cx.contiguous();
  at::Tensor grad_gates = at::empty({T, B, 4 * H}, input.options());
  at::Tensor grad_gates_2d = grad_gates.view({T * B, 4 * H});
  // Each row's grad_gates at the step that consumed (h0, c0): they give grad_hx and h0's share of grad_w_hh.
  at::Tensor grad_gates_first = at::zeros({B, 4 * H}, input.options());
  at::Tensor grad_cx = gcn.clone();  // rows of length 0 pass the gradient straight through
  at::Tensor grad_h = at::empty({B, H}, input.options());  // dL/dh_t: recurrent part from the GEMM, then + grad_output
  at::Tensor grad_c = at::empty({B, H}, input.options());
  at::Tensor grad_c_prev = at::empty({B, H}, input.options());
  const RecurrentGemm recurrent(w_hh, B);
  const std::vector<int64_t> length = row_lengths(lengths, T, B);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_bwd_cpu", [&] {
    const scalar_t *pgo = go.const_data_ptr<scalar_t>(), *pghn = ghn.const_data_ptr<scalar_t>(),
                   *pgcn = gcn.const_data_ptr<scalar_t>(), *pg = gt.const_data_ptr<scalar_t>(),
                   *pc = cc.const_data_ptr<scalar_t>(), *pc0 = c0.const_data_ptr<scalar_t>();
    scalar_t* pdg = grad_gates.data_ptr<scalar_t>();
    scalar_t* pdg_first = grad_gates_first.data_ptr<scalar_t>();
    scalar_t* pdcx = grad_cx.data_ptr<scalar_t>();
    scalar_t* pdh = grad_h.data_ptr<scalar_t>();
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
      const int64_t t_prev = reverse ? t + 1 : t - 1;
      scalar_t* pdc = grad_c.data_ptr<scalar_t>();
      scalar_t* pdc_prev = grad_c_prev.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t row = t * B + b;
          scalar_t* dg = pdg + row * 4 * H;
          if (t >= length[b]) {
            std::memset(dg, 0, 4 * H * sizeof(scalar_t));
            continue;
          }
          const SequenceSteps steps = sequence_steps(length[b], reverse);
          // The step that produced h_n takes grad_h_n / grad_c_n; every other takes what the later step passed back.
          const bool at_last = t == steps.last, at_first = t == steps.first;
          scalar_t* dh = pdh + b * H;
          const scalar_t* dh_carry = at_last ? pghn + b * H : dh;
          const scalar_t* dout = pgo + row * H;
          for (int64_t j = 0; j < H; ++j) dh[j] = dh_carry[j] + dout[j];
          lstm_cell_bwd_row<scalar_t>(pg + row * 4 * H, at_first ? pc0 + b * H : pc + (t_prev * B + b) * H,
                                      pc + row * H, dh, at_last ? pgcn + b * H : pdc + b * H, dg,
                                      at_first ? pdcx + b * H : pdc_prev + b * H, H);
          if (at_first) std::memcpy(pdg_first + b * 4 * H, dg, 4 * H * sizeof(scalar_t));
        }
      });
      std::swap(grad_c, grad_c_prev);
      if (s + 1 < T) {
        at::Tensor grad_gates_t = grad_gates_2d.narrow(0, t * B, B);
        recurrent.run(grad_gates_t, grad_h, /*accumulate=*/false);
      }
    }
  });
  return lstm_layer_grads_after_loop(grad_gates, grad_gates_first, grad_h_n, grad_cx, input, hx, w_ih, w_hh,
                                     lengths, reverse, output);
}

// The size rule of the persistent CUDA recurrences as an op, so that tests and benchmarks ask the one function the
// kernels use: [units, rows, blocks, chunk, depth, splits, ld, smem bytes], or [] when the layer does not fit.
std::vector<int64_t> lstm_layer_persistent_plan_op(int64_t batch, int64_t hidden, at::ScalarType dtype, int64_t sms,
                                                   int64_t smem_per_block, int64_t cc_major, bool backward) {
  const auto plan = lstm_layer_persistent_plan(batch, hidden, dtype, sms, smem_per_block, cc_major, backward);
  if (!plan) return {};
  return {plan->units, plan->rows, plan->blocks, plan->chunk, plan->depth, plan->splits, plan->ld, plan->smem};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastseq2seq, m) {
  // Returns (output [T, B, H], h_n, c_n, gates [T, B, 4H], cells [T, B, H]): gates are the activated (i, f, g, o) and
  // cells the cell state c_t of every step, saved for the backward; both are zero past a row's length.
  m.def("lstm_layer_fwd(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " Tensor? lengths, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b); grad_b serves b_ih and b_hh alike.
  m.def("lstm_layer_bwd(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor hx, Tensor cx,"
        " Tensor w_ih, Tensor w_hh, Tensor? lengths, bool reverse, Tensor output, Tensor gates, Tensor cells)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_layer_persistent_plan(int batch, int hidden, ScalarType dtype, int sms, int smem_per_block,"
        " int cc_major, bool backward=False) -> int[]",
        &lstm_layer_persistent_plan_op);
}

TORCH_LIBRARY_IMPL(fastseq2seq, CPU, m) {
  m.impl("lstm_layer_fwd", &lstm_layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &lstm_layer_bwd_cpu);
}

}  // namespace fastseq2seq
