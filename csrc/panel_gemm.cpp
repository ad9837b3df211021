#include "panel_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "cpu_dispatch.h"
#ifdef FS2S_X86
#include <immintrin.h>
#endif

namespace fastseq2seq {

bool panel_gemm_supported(const at::Tensor& t) { return t.scalar_type() == at::kFloat && cpu_has_avx512(); }

namespace {

// Panels [P, K, 64] of a transposed weight: lane l of panel p is row row_of(p, l) of w [rows, K], or zeros where
// that is -1. Blocks of k keep the destination lines being filled in L1 (ATen's strided copy of the transposed or
// permuted view takes several times longer).
template <typename RowOf>
at::Tensor pack_transposed_panels(const at::Tensor& w, int64_t P, RowOf row_of) {
  const int64_t K = w.size(1);
  const at::Tensor src = w.contiguous();
  at::Tensor panels = at::empty({P, K, 64}, w.options());
  const float* pw = src.const_data_ptr<float>();
  float* out = panels.data_ptr<float>();
  constexpr int64_t kBlock = 128;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* panel = out + p * K * 64;
      for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
        const int64_t k1 = std::min(K, k0 + kBlock);
        for (int64_t lane = 0; lane < 64; ++lane) {
          const int64_t r = row_of(p, lane);
          const float* row = pw + r * K;
          for (int64_t k = k0; k < k1; ++k) panel[k * 64 + lane] = r >= 0 ? row[k] : 0.0f;
        }
      }
    }
  });
  return panels;
}

}  // namespace

at::Tensor pack_gate_panels(const at::Tensor& w) {
  // Row q*H + j of w becomes lane 16q + j%16 of panel j/16.
  const int64_t H = w.size(0) / 4;
  return pack_transposed_panels(w, (H + 15) / 16, [H](int64_t p, int64_t lane) {
    const int64_t j = 16 * p + lane % 16;
    return j < H ? lane / 16 * H + j : -1;
  });
}

at::Tensor pack_row_panels(const at::Tensor& w) {
  const int64_t N = w.size(0);
  return pack_transposed_panels(w, (N + 63) / 64, [N](int64_t p, int64_t lane) {
    const int64_t n = 64 * p + lane;
    return n < N ? n : -1;
  });
}

PanelOutput gate_panel_output(int64_t panel, int64_t H) {
  const auto lanes = static_cast<uint16_t>(std::min<int64_t>(16, H - 16 * panel));
  return {{16 * panel, H + 16 * panel, 2 * H + 16 * panel, 3 * H + 16 * panel}, {lanes, lanes, lanes, lanes}};
}

at::Tensor pack_column_panels(const at::Tensor& w) {
  const int64_t K = w.size(0), N = w.size(1), P = (N + 63) / 64;
  const at::Tensor src = w.contiguous();
  at::Tensor panels = at::empty({P, K, 64}, w.options());
  const float* pw = src.const_data_ptr<float>();
  float* out = panels.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = std::min<int64_t>(64, N - 64 * p);
      for (int64_t k = 0; k < K; ++k) {
        float* dst = out + (p * K + k) * 64;
        std::memcpy(dst, pw + k * N + 64 * p, n * sizeof(float));
        std::fill(dst + n, dst + 64, 0.0f);
      }
    }
  });
  return panels;
}

PanelOutput column_panel_output(int64_t panel, int64_t N) {
  PanelOutput out{};
  for (int q = 0; q < 4; ++q) {
    out.offset[q] = 64 * panel + 16 * q;
    out.lanes[q] = static_cast<uint16_t>(std::clamp<int64_t>(N - out.offset[q], 0, 16));
  }
  return out;
}

#ifdef FS2S_X86
namespace {

// R rows x 64 columns: 4R accumulators, 4 panel vectors and a broadcast fit AVX-512's 32 registers for R <= 6.
template <int R>
FS2S_TARGET_AVX512 void panel_gemm_block(const float* a, int64_t lda, int64_t a_col_stride, const float* panel,
                                         int64_t K, float* c, int64_t ldc, const PanelOutput& out, bool accumulate,
                                         const float* bias) {
  __m512 acc[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * 64;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32),
                 w3 = _mm512_loadu_ps(w + 48);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + k * a_col_stride]);
      acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(x, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(x, w3, acc[r][3]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) {
      const __mmask16 mask = static_cast<__mmask16>((1u << out.lanes[q]) - 1u);
      float* dst = c + r * ldc + out.offset[q];
      __m512 sum = acc[r][q];
      if (accumulate) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, dst));
      if (bias) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, bias + out.offset[q]));
      _mm512_mask_storeu_ps(dst, mask, sum);
    }
  }
}

}  // namespace

void panel_gemm(const float* a, int64_t lda, int64_t rows, const float* panel, int64_t K, float* c, int64_t ldc,
                const PanelOutput& out, bool accumulate, const float* bias, int64_t a_col_stride) {
  constexpr int64_t kBlock = 6;
  int64_t r = 0;
  for (; r + kBlock <= rows; r += kBlock)
    panel_gemm_block<kBlock>(a + r * lda, lda, a_col_stride, panel, K, c + r * ldc, ldc, out, accumulate, bias);
  const float* a_tail = a + r * lda;
  float* c_tail = c + r * ldc;
  switch (rows - r) {
    case 5: return panel_gemm_block<5>(a_tail, lda, a_col_stride, panel, K, c_tail, ldc, out, accumulate, bias);
    case 4: return panel_gemm_block<4>(a_tail, lda, a_col_stride, panel, K, c_tail, ldc, out, accumulate, bias);
    case 3: return panel_gemm_block<3>(a_tail, lda, a_col_stride, panel, K, c_tail, ldc, out, accumulate, bias);
    case 2: return panel_gemm_block<2>(a_tail, lda, a_col_stride, panel, K, c_tail, ldc, out, accumulate, bias);
    case 1: return panel_gemm_block<1>(a_tail, lda, a_col_stride, panel, K, c_tail, ldc, out, accumulate, bias);
    default: return;
  }
}
#else
void panel_gemm(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, const PanelOutput&, bool,
                const float*, int64_t) {
  TORCH_CHECK(false, "panel_gemm needs an x86-64 CPU with AVX-512");
}
#endif

void panel_gemm_all(const float* a, int64_t lda, int64_t rows, const at::Tensor& panels, float* c, int64_t ldc,
                    PanelOutput (*output)(int64_t, int64_t), int64_t N, bool accumulate, const float* bias,
                    int64_t a_col_stride) {
  const int64_t P = panels.size(0), K = panels.size(1);
  // Rows per tile: at most what keeps a tile's slice of `a` in L2 beside the panel, split evenly in multiples of the
  // 6-row block (64 rows as 60 + 4 left a slow 4-row tail to every panel).
  const int64_t max_tile_rows = std::max<int64_t>(6, 512 * 1024 / (4 * std::max<int64_t>(K, 1)));
  const int64_t even_split = std::max<int64_t>(1, (rows + max_tile_rows - 1) / max_tile_rows);
  const int64_t tile_rows = std::max<int64_t>(6, ((rows + even_split - 1) / even_split + 5) / 6 * 6);
  const int64_t row_tiles = (rows + tile_rows - 1) / tile_rows;
  const float* pw = panels.const_data_ptr<float>();
  at::parallel_for(0, row_tiles * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile / P * tile_rows, p = tile % P;
      panel_gemm(a + r0 * lda, lda, std::min(tile_rows, rows - r0), pw + p * K * 64, K, c + r0 * ldc, ldc,
                 output(p, N), accumulate, bias, a_col_stride);
    }
  });
}

}  // namespace fastseq2seq
