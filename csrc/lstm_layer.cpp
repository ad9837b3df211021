// LSTM layer op schemas and the CPU kernels: the whole recurrence of one direction inside one op.
//
// Forward: the input projections of all steps are one GEMM into `gates` [T, B, 4H] before the loop; each step adds
// h_{t-1} W_hh^T into its slice of that buffer and runs the fused gate math, leaving the activated gates and the cell
// state in place for the backward. Backward: backpropagation through time, per step the recurrent product
// (dgates_t W_hh) and the fused elementwise backward, then dx, dW_ih, dW_hh and db as a few large GEMMs over all
// steps. No tensor is allocated inside either loop. The recurrent products run as the panel GEMM (panel_gemm.h)
// where it is supported, else as MKL's or ATen's GEMM.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "lstm_cell.h"
#include "lstm_layer.h"
#include "lstm_layer_persistent.h"
#include "panel_gemm.h"

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
  void run(const at::Tensor& a, at::Tensor out, bool accumulate) const {
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

// Panels per task: one task per thread, each keeping its panels of W_hh in its own cache over all steps.
int64_t panel_grain(int64_t panels) {
  return std::max<int64_t>(1, (panels + at::get_num_threads() - 1) / at::get_num_threads());
}

// lengths, or T for every row when none are given.
std::vector<int64_t> row_lengths(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  if (!lengths) return std::vector<int64_t>(B, T);
  const at::Tensor l = lengths->contiguous();
  const int64_t* p = l.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + B);
}

// Sets n units of each gate of a gates row (stride H between gates) to zero.
template <typename scalar_t>
void zero_gate_units(scalar_t* gates, int64_t n, int64_t H) {
  for (int64_t k = 0; k < 4; ++k) std::memset(gates + k * H, 0, n * sizeof(scalar_t));
}

// The forward's loop over the steps: two ways through them, one per-row update (update_rows). With the panel GEMM
// (fp32, AVX-512) each thread owns a slice of hidden units for the whole sequence: its step is the recurrent product
// for its units' four gates followed by their gate math, and the fork/join between steps is the only
// synchronization. Otherwise each step is one multi-threaded GEMM over all units, then the gate math in parallel
// over rows.
template <typename scalar_t>
void forward_recurrence(at::Tensor& gates, at::Tensor& cells, at::Tensor& output, at::Tensor& h_n, at::Tensor& c_n,
                        const at::Tensor& w_hh, const std::vector<int64_t>& length, bool reverse) {
  const int64_t T = gates.size(0), B = gates.size(1), H = h_n.size(1);
  scalar_t* pg = gates.data_ptr<scalar_t>();
  scalar_t* pc = cells.data_ptr<scalar_t>();
  scalar_t* pout = output.data_ptr<scalar_t>();
  scalar_t* pcn = c_n.data_ptr<scalar_t>();
  // Units j0 .. j0+n-1 of every row at step t, once h_prev W_hh^T is in gates: the gate math into h_next, or for a
  // row past its length zero outputs (and deterministic saved buffers) with its state carried over.
  auto update_rows = [&](int64_t t, int64_t j0, int64_t n, const scalar_t* h_prev, scalar_t* h_next,
                         int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = t * B + b;
      scalar_t* g = pg + row * 4 * H + j0;
      scalar_t* c = pc + row * H + j0;
      scalar_t* h = pout + row * H + j0;
      if (t >= length[b]) {
        zero_gate_units(g, n, H);
        std::memset(c, 0, n * sizeof(scalar_t));
        std::memset(h, 0, n * sizeof(scalar_t));
        if (h_next != h_prev) std::memcpy(h_next + b * H + j0, h_prev + b * H + j0, n * sizeof(scalar_t));
        continue;
      }
      lstm_cell_fwd_row<scalar_t>(g, nullptr, nullptr, pcn + b * H + j0, c, h, n, H);  // biases: in the projection
      std::memcpy(h_next + b * H + j0, h, n * sizeof(scalar_t));
      std::memcpy(pcn + b * H + j0, c, n * sizeof(scalar_t));
    }
  };
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (panel_gemm_supported(gates)) {
      const at::Tensor panels = pack_gate_panels(w_hh);
      const int64_t P = panels.size(0);
      const float* pw = panels.const_data_ptr<float>();
      // When every row runs all T steps, a step reads h_{t-1} and c_{t-1} where the step before wrote them (output,
      // cells) and the final state is copied once at the end; else a row past its length carries its state, which
      // therefore runs in h_n / c_n (and a spare h buffer) for every row.
      const bool full_length = std::all_of(length.begin(), length.end(), [T](int64_t l) { return l == T; });
      at::Tensor h_spare = full_length ? at::Tensor() : at::empty_like(h_n);
      float *h_prev = h_n.data_ptr<float>(), *h_next = full_length ? nullptr : h_spare.data_ptr<float>();
      const float* c_prev = pcn;
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = reverse ? T - 1 - s : s;
        at::parallel_for(0, P, panel_grain(P), [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t j0 = 16 * p, n = std::min<int64_t>(16, H - j0);
            panel_gemm(h_prev, H, B, pw + p * H * 64, H, pg + t * B * 4 * H, 4 * H, gate_panel_output(p, H),
                       /*accumulate=*/true);
            if (!full_length) {
              update_rows(t, j0, n, h_prev, h_next, 0, B);
              continue;
            }
            for (int64_t b = 0; b < B; ++b) {
              const int64_t row = t * B + b;
              lstm_cell_fwd_row<float>(pg + row * 4 * H + j0, nullptr, nullptr, c_prev + b * H + j0,
                                       pc + row * H + j0, pout + row * H + j0, n, H);
            }
          }
        });
        if (full_length) {
          h_prev = pout + t * B * H;
          c_prev = pc + t * B * H;
        } else {
          std::swap(h_prev, h_next);
        }
      }
      if (full_length) {
        h_n.copy_(output.select(0, reverse ? 0 : T - 1));
        c_n.copy_(cells.select(0, reverse ? 0 : T - 1));
      } else if (h_prev != h_n.data_ptr<float>()) {
        h_n.copy_(h_spare);
      }
      return;
    }
  }
  const RecurrentGemm recurrent(w_hh.t(), B);
  scalar_t* ph = h_n.data_ptr<scalar_t>();
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    recurrent.run(h_n, gates.select(0, t), /*accumulate=*/true);
    at::parallel_for(0, B, row_grain(H),
                     [&](int64_t b0, int64_t b1) { update_rows(t, 0, H, ph, ph, b0, b1); });
  }
}

// The backward's loop over the steps, last first, the same two ways as the forward's (the panel GEMM's panels are
// 64 hidden units of grad_h here).
template <typename scalar_t>
void backward_recurrence(at::Tensor& grad_gates, at::Tensor& grad_gates_first, at::Tensor& grad_cx, at::Tensor& grad_h,
                         at::Tensor& grad_c, at::Tensor& grad_c_prev, const at::Tensor& go, const at::Tensor& ghn,
                         const at::Tensor& gcn, const at::Tensor& gt, const at::Tensor& cc, const at::Tensor& c0,
                         const at::Tensor& w_hh, const std::vector<int64_t>& length, bool reverse) {
  const int64_t T = grad_gates.size(0), B = grad_gates.size(1), H = grad_h.size(1);
  const scalar_t *pgo = go.const_data_ptr<scalar_t>(), *pghn = ghn.const_data_ptr<scalar_t>(),
                 *pgcn = gcn.const_data_ptr<scalar_t>(), *pg = gt.const_data_ptr<scalar_t>(),
                 *pc = cc.const_data_ptr<scalar_t>(), *pc0 = c0.const_data_ptr<scalar_t>();
  scalar_t* pdg = grad_gates.data_ptr<scalar_t>();
  scalar_t* pdg_first = grad_gates_first.data_ptr<scalar_t>();
  scalar_t* pdcx = grad_cx.data_ptr<scalar_t>();
  scalar_t* pdh = grad_h.data_ptr<scalar_t>();
  // Units j0 .. j0+n-1 of every row at step t, once grad_h holds the gradient the later step passed back to h_t:
  // grad_gates of step t, and grad_c_prev from grad_c.
  auto update_rows = [&](int64_t t, int64_t j0, int64_t n, const scalar_t* pdc, scalar_t* pdc_prev, int64_t b0,
                         int64_t b1) {
    const int64_t t_prev = reverse ? t + 1 : t - 1;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = t * B + b;
      scalar_t* dg = pdg + row * 4 * H + j0;
      if (t >= length[b]) {
        zero_gate_units(dg, n, H);
        continue;
      }
      const SequenceSteps steps = sequence_steps(length[b], reverse);
      // The step that produced h_n takes grad_h_n / grad_c_n; every other takes what the later step passed back.
      const bool at_last = t == steps.last, at_first = t == steps.first;
      const int64_t u = b * H + j0;  // unit j0 of row b in a [B, H] buffer
      scalar_t* dh = pdh + u;
      const scalar_t* dh_carry = at_last ? pghn + u : dh;
      const scalar_t* dout = pgo + row * H + j0;
      for (int64_t j = 0; j < n; ++j) dh[j] = dh_carry[j] + dout[j];
      lstm_cell_bwd_row<scalar_t>(pg + row * 4 * H + j0, at_first ? pc0 + u : pc + (t_prev * B + b) * H + j0,
                                  pc + row * H + j0, dh, at_last ? pgcn + u : pdc + u, dg,
                                  at_first ? pdcx + u : pdc_prev + u, n, H);
      if (at_first) {
        for (int64_t k = 0; k < 4; ++k)
          std::memcpy(pdg_first + b * 4 * H + k * H + j0, dg + k * H, n * sizeof(scalar_t));
      }
    }
  };
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (panel_gemm_supported(grad_gates)) {
      const at::Tensor panels = pack_column_panels(w_hh);
      const int64_t P = panels.size(0);
      const float* pw = panels.const_data_ptr<float>();
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
        const int64_t t_later = reverse ? t - 1 : t + 1;  // the step this loop visited before t
        const float* pdc = grad_c.data_ptr<float>();
        float* pdc_prev = grad_c_prev.data_ptr<float>();
        at::parallel_for(0, P, panel_grain(P), [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            // Step 0 of this loop is every valid row's last step: it starts from grad_h_n, not grad_h.
            if (s > 0)
              panel_gemm(pdg + t_later * B * 4 * H, 4 * H, B, pw + p * 4 * H * 64, 4 * H, pdh, H,
                         column_panel_output(p, H), /*accumulate=*/false);
            update_rows(t, 64 * p, std::min<int64_t>(64, H - 64 * p), pdc, pdc_prev, 0, B);
          }
        });
        std::swap(grad_c, grad_c_prev);
      }
      return;
    }
  }
  const RecurrentGemm recurrent(w_hh, B);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? s : T - 1 - s;
    const scalar_t* pdc = grad_c.data_ptr<scalar_t>();
    scalar_t* pdc_prev = grad_c_prev.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H),
                     [&](int64_t b0, int64_t b1) { update_rows(t, 0, H, pdc, pdc_prev, b0, b1); });
    std::swap(grad_c, grad_c_prev);
    if (s + 1 < T) recurrent.run(grad_gates.select(0, t), grad_h, /*accumulate=*/false);
  }
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
  const at::Tensor input_2d = input.reshape({T * B, I}).contiguous();
  const at::Tensor bias = b_ih ? (*b_ih + *b_hh).contiguous() : at::Tensor();
  if (panel_gemm_supported(input)) {
    panel_gemm_all(input_2d.const_data_ptr<float>(), I, T * B, pack_gate_panels(w_ih), gates.data_ptr<float>(),
                   4 * H, gate_panel_output, H, /*accumulate=*/false, b_ih ? bias.const_data_ptr<float>() : nullptr);
  } else if (b_ih) {
    at::addmm_out(gates_2d, bias, input_2d, w_ih.t());
  } else {
    at::mm_out(gates_2d, input_2d, w_ih.t());
  }
  const std::vector<int64_t> length = row_lengths(lengths, T, B);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_fwd_cpu", [&] {
    forward_recurrence<scalar_t>(gates, cells, output, h_n, c_n, w_hh, length, reverse);
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
  // Each row's grad_gates at the step that consumed (h0, c0): they give grad_hx and h0's share of grad_w_hh.
  at::Tensor grad_gates_first = at::zeros({B, 4 * H}, input.options());
  at::Tensor grad_cx = gcn.clone();  // rows of length 0 pass the gradient straight through
  at::Tensor grad_h = at::empty({B, H}, input.options());  // dL/dh_t: recurrent part from the GEMM, then + grad_output
  at::Tensor grad_c = at::empty({B, H}, input.options());
  at::Tensor grad_c_prev = at::empty({B, H}, input.options());
  const std::vector<int64_t> length = row_lengths(lengths, T, B);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_bwd_cpu", [&] {
    backward_recurrence<scalar_t>(grad_gates, grad_gates_first, grad_cx, grad_h, grad_c, grad_c_prev, go, ghn, gcn,
                                  gt, cc, c0, w_hh, length, reverse);
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
