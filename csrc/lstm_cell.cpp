// LSTM cell op schemas and the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lstm_cell.h"
#include "panel_gemm.h"
#include "weight_panels.h"

namespace fastseq2seq {
namespace {

// Rows per task: enough work per thread to amortize the fork.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * H)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  check_lstm_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  const int64_t B = input.size(0), H = hx.size(1);
  // Two GEMMs accumulating into one buffer: cheaper than concatenating [x, h] and [W_ih, W_hh] per call. Inside a
  // constant-weights scope (a decoder loop) over the gate weights packed once for the scope.
  const auto panels_ih = scoped_weight_panels(w_ih, PanelLayout::kGates);
  const auto panels_hh = panels_ih ? scoped_weight_panels(w_hh, PanelLayout::kGates) : std::nullopt;
  at::Tensor gates;
  if (panels_hh) {
    gates = at::empty({B, 4 * H}, input.options());
    const at::Tensor x = input.contiguous(), h_prev = hx.contiguous();
    panel_gemm_all(x.const_data_ptr<float>(), x.size(1), B, *panels_ih, gates.data_ptr<float>(), 4 * H,
                   gate_panel_output, H, /*accumulate=*/false);
    panel_gemm_all(h_prev.const_data_ptr<float>(), H, B, *panels_hh, gates.data_ptr<float>(), 4 * H,
                   gate_panel_output, H, /*accumulate=*/true);
  } else if (panel_gemm_supported(input) && reads_weight_in_place(B)) {
    // Weights used once: gates^T = W_ih x^T + W_hh h^T, the weights read in place and x, h packed (B rows), where
    // MKL would pack each whole weight.
    at::Tensor gates_t = transposed_product(w_ih.t(), input.t());
    transposed_product_out(w_hh.t(), hx.t(), gates_t, /*accumulate=*/true);
    gates = gates_t.t().contiguous();
  } else {
    gates = at::mm(input, w_ih.t());
    gates.addmm_(hx, w_hh.t());
  }
  at::Tensor c = at::empty({B, H}, input.options());
  at::Tensor h = at::empty({B, H}, input.options());
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor bi = b_ih ? b_ih->contiguous() : at::Tensor(), bh = b_hh ? b_hh->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_fwd_cpu", [&] {
    scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* pb_ih = bi.defined() ? bi.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pb_hh = bh.defined() ? bh.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pcx = cx_c.const_data_ptr<scalar_t>();
    scalar_t* pc = c.data_ptr<scalar_t>();
    scalar_t* ph = h.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        lstm_cell_fwd_row(g + b * 4 * H, pb_ih, pb_hh, pcx + b * H, pc + b * H, ph + b * H, H, H);
    });
  });
  return {h, c, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd_cpu(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& gates,
    const at::Tensor& c) {
  check_lstm_cell_args(input, hx, cx, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t B = input.size(0), H = hx.size(1);
  check_shape(grad_h, "grad_h", {B, H});
  check_shape(grad_c, "grad_c", {B, H});
  check_shape(gates, "gates", {B, 4 * H});
  check_shape(c, "c", {B, H});
  at::Tensor grad_gates = at::empty({B, 4 * H}, input.options());
  at::Tensor grad_cx = at::empty({B, H}, input.options());
  const at::Tensor gh = grad_h.contiguous(), gc = grad_c.contiguous(), gt = gates.contiguous(), cc = c.contiguous(),
                   cxc = cx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_bwd_cpu", [&] {
    const scalar_t *pg = gt.const_data_ptr<scalar_t>(), *pcx = cxc.const_data_ptr<scalar_t>(),
                   *pc = cc.const_data_ptr<scalar_t>(), *pgh = gh.const_data_ptr<scalar_t>(),
                   *pgc = gc.const_data_ptr<scalar_t>();
    scalar_t* pgg = grad_gates.data_ptr<scalar_t>();
    scalar_t* pgcx = grad_cx.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        lstm_cell_bwd_row(pg + b * 4 * H, pcx + b * H, pc + b * H, pgh + b * H, pgc + b * H, pgg + b * 4 * H,
                          pgcx + b * H, H, H);
    });
  });
  // On AVX-512 in fp32: dx and dh over the weights packed once per constant-weights scope, dW_ih and dW_hh as
  // grad_gates^T @ x on panels of x (B rows: cheap to pack), which beats MKL's sgemm for a batch of rows.
  return {times_weight(grad_gates, w_ih), times_weight(grad_gates, w_hh), grad_cx,
          transposed_product(grad_gates, input), transposed_product(grad_gates, hx), grad_gates.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastseq2seq, m) {
  // Returns (h, c, gates): gates are the activated (i, f, g, o), saved for the backward.
  m.def("lstm_cell_fwd(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh)"
        " -> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b); grad_b serves b_ih and b_hh alike.
  m.def("lstm_cell_bwd(Tensor grad_h, Tensor grad_c, Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh,"
        " Tensor gates, Tensor c) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastseq2seq, CPU, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cpu);
}

}  // namespace fastseq2seq
