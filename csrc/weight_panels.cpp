#include "weight_panels.h"

#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "panel_gemm.h"

namespace fastseq2seq {
namespace {

// Weights a scope keeps packed; past this the least recently used is dropped (a weight made anew at every call,
// which never hits, must not grow the cache without bound).
constexpr size_t kMaxEntries = 16;

// What a weight was when packed: the same tensor may since have been changed in place (version), pointed at other
// data or given another shape (set_, resize_).
struct Entry {
  at::Tensor weight;  // held, so that its TensorImpl cannot be reused by another tensor while the entry lives
  const void* data;
  int64_t version;
  std::vector<int64_t> sizes, strides;
  PanelLayout layout;
  at::Tensor panels;

  bool still_matches(const at::Tensor& w) const {
    return data == w.const_data_ptr() && version == w._version() && w.sizes() == at::IntArrayRef(sizes) &&
           w.strides() == at::IntArrayRef(strides);
  }
};

// Per thread: the ops run on the thread that called them, and a scope belongs to the code that opened it.
thread_local int scope_depth = 0;
thread_local std::vector<Entry> entries;  // most recently used last

void constant_weights_scope(bool enter) {
  if (enter) {
    ++scope_depth;
    return;
  }
  TORCH_CHECK(scope_depth > 0, "fastseq2seq: constant_weights_scope(False) without a matching enter");
  if (--scope_depth == 0) entries.clear();
}

}  // namespace

std::optional<at::Tensor> scoped_weight_panels(const at::Tensor& w, PanelLayout layout) {
  if (scope_depth == 0 || !w.device().is_cpu() || w.is_inference() || !panel_gemm_supported(w)) return std::nullopt;
  if (w.dim() != 2 || w.size(layout == PanelLayout::kColumns ? 0 : 1) > kMaxPanelDepth) return std::nullopt;
  for (auto it = entries.begin(); it != entries.end(); ++it) {
    if (it->weight.unsafeGetTensorImpl() != w.unsafeGetTensorImpl() || it->layout != layout) continue;
    if (it->still_matches(w)) {
      std::rotate(it, it + 1, entries.end());
      return entries.back().panels;
    }
    entries.erase(it);
    break;
  }
  if (entries.size() == kMaxEntries) entries.erase(entries.begin());
  at::Tensor panels = layout == PanelLayout::kGates    ? pack_gate_panels(w)
                      : layout == PanelLayout::kLinear ? pack_row_panels(w)
                                                       : pack_column_panels(w);
  entries.push_back({w, w.const_data_ptr(), w._version(), w.sizes().vec(), w.strides().vec(), layout, panels});
  return panels;
}

at::Tensor times_weight(const at::Tensor& a, const at::Tensor& w) {
  const auto panels = scoped_weight_panels(w, PanelLayout::kColumns);
  if (!panels) {
    if (column_strips_serve(a, w)) return column_strips_product(a, w);
    // Deeper than panels are kept (an output layer's input gradient: K = the vocabulary): packed per slice of K
    // (measured [1920, 8000] @ [8000, 512]: 72 ms against MKL's 79).
    return w.size(0) > kMaxPanelDepth ? transposed_product(a.t(), w) : a.mm(w);
  }
  const at::Tensor ac = a.contiguous();
  const int64_t M = ac.size(0), N = w.size(1);
  at::Tensor out = at::empty({M, N}, a.options());
  panel_gemm_all(ac.const_data_ptr<float>(), ac.size(1), M, *panels, out.data_ptr<float>(), N, column_panel_output, N,
                 /*accumulate=*/false);
  return out;
}

TORCH_LIBRARY_FRAGMENT(fastseq2seq, m) {
  // Enter (true) or leave (false) a constant-weights scope of the calling thread; the packed weights of a scope are
  // freed when its outermost level is left.
  m.def("constant_weights_scope(bool enter) -> ()", &constant_weights_scope);
}

}  // namespace fastseq2seq
