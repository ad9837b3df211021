// Packed weight panels (panel_gemm.h) made once and reused while the caller vouches that its weights do not change:
// inside a constant-weights scope (op fastseq2seq::constant_weights_scope, entered by fastseq2seq.ops.constant_weights,
// which the Seq2Seq decoders use). A decoder step's products have few rows, and MKL's sgemm repacks the whole weight
// at every call: measured on the AVX-512 development machine, 2 threads, [64, 512] @ [512, 8000] at 117 GFLOP/s with
// MKL against 213 from panels packed once; a whole Bahdanau decoder step's products 122 against 196.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace fastseq2seq {

enum class PanelLayout {
  kGates,    // pack_gate_panels(w): w [4H, K] an LSTM gate weight; results at gate_panel_output
  kLinear,   // pack_row_panels(w): w [N, K] a linear layer's weight; results at column_panel_output
  kColumns,  // pack_column_panels(w): w [K, N] as it is (grad_gates @ w_ih); results at column_panel_output
};

// The panels of w in `layout` when they can be reused: inside a constant-weights scope, for a CPU fp32 weight with a
// version counter (not an inference tensor) on a CPU with AVX-512, of product depth at most kMaxPanelDepth. Kept
// for the rest of the scope, keyed by the tensor, its data pointer, shape, strides and version, so an in-place
// change made inside the scope repacks.
// nullopt otherwise: the caller takes its usual path.
std::optional<at::Tensor> scoped_weight_panels(const at::Tensor& w, PanelLayout layout);

// a [M, K] @ w [K, N], the input gradient of a product with a weight: over w's panels when the scope has them
// (layout kColumns), else over w's column strips in place (column_strips_serve), else at::mm, or for K deeper than
// kMaxPanelDepth transposed_product's slices.
at::Tensor times_weight(const at::Tensor& a, const at::Tensor& w);

}  // namespace fastseq2seq
