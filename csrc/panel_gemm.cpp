#include "panel_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_dispatch.h"
#ifdef FS2S_X86
#include <immintrin.h>
#endif

namespace fastseq2seq {

bool panel_gemm_supported(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && cpu_has_avx512();
}

namespace {

// Lanes 16q..16q+15 of a panel hold `count` consecutive rows of w starting at row `first` (zeros past count).
struct LaneGroup {
  int64_t first, count;
};

// dst[k * 64 + i] = rows[i * K + k] for i < count (zeros after), k < K: the group's rows transposed into its lanes.
void pack_lane_group(const float* rows, int64_t K, int64_t count, float* dst) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < 16; ++i) dst[k * 64 + i] = i < count ? rows[i * K + k] : 0.0f;
}

#ifdef FS2S_X86
// In place: row j of the 16 x 16 block v becomes its column j.
FS2S_TARGET_AVX512 void transpose_16x16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // interleave pairs of rows: 2x2 blocks of floats
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // then pairs of those: 4x4 blocks within each 128-bit lane
    for (int j = 0; j < 2; ++j) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      v[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      v[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  for (int i = 0; i < 8; ++i) {  // then 128-bit lanes across rows 4 apart, twice
    const int a = (i / 4) * 8 + i % 4;
    t[a] = _mm512_shuffle_f32x4(v[a], v[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_f32x4(v[a], v[a + 4], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// The same as pack_lane_group with 16 x 16 blocks transposed in registers (the scalar transpose and a gather per k
// are several times slower).
FS2S_TARGET_AVX512 void pack_lane_group_avx512(const float* rows, int64_t K, int64_t count, float* dst) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t width = std::min<int64_t>(16, K - k0);
    const auto mask = static_cast<__mmask16>((1u << width) - 1u);
    __m512 v[16];
    for (int64_t i = 0; i < 16; ++i)
      v[i] = i < count ? _mm512_maskz_loadu_ps(mask, rows + i * K + k0) : _mm512_setzero_ps();
    transpose_16x16(v);
    for (int64_t j = 0; j < width; ++j) _mm512_storeu_ps(dst + (k0 + j) * 64, v[j]);
  }
}
#endif

// Panels [P, K, 64] of a transposed weight w [rows, K]: group_of(p, q) says which rows lane group q of panel p holds.
template <typename GroupOf>
at::Tensor pack_transposed_panels(const at::Tensor& w, int64_t P, GroupOf group_of) {
  const int64_t K = w.size(1);
  const at::Tensor src = w.contiguous();
  at::Tensor panels = at::empty({P, K, 64}, w.options());
  const float* pw = src.const_data_ptr<float>();
  float* out = panels.data_ptr<float>();
#ifdef FS2S_X86
  const auto pack_group = cpu_has_avx512() ? pack_lane_group_avx512 : pack_lane_group;
#else
  const auto pack_group = pack_lane_group;
#endif
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t q = 0; q < 4; ++q) {
        const LaneGroup group = group_of(p, q);
        pack_group(pw + group.first * K, K, group.count, out + p * K * 64 + 16 * q);
      }
    }
  });
  return panels;
}

}  // namespace

at::Tensor pack_gate_panels(const at::Tensor& w) {
  // Lane group q of panel p: gate q of hidden units 16p..16p+15, rows q*H + 16p onwards.
  const int64_t H = w.size(0) / 4;
  return pack_transposed_panels(w, (H + 15) / 16, [H](int64_t p, int64_t q) {
    return LaneGroup{q * H + 16 * p, std::min<int64_t>(16, H - 16 * p)};
  });
}

at::Tensor pack_row_panels(const at::Tensor& w) {
  const int64_t N = w.size(0);
  return pack_transposed_panels(w, (N + 63) / 64, [N](int64_t p, int64_t q) {
    const int64_t first = 64 * p + 16 * q, count = std::clamp<int64_t>(N - first, 0, 16);
    return LaneGroup{count > 0 ? first : 0, count};
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
                                         int64_t panel_ld, int64_t K, float* c, int64_t ldc, const PanelOutput& out,
                                         bool accumulate, const float* bias) {
  __m512 acc[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * panel_ld;
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
                const PanelOutput& out, bool accumulate, const float* bias, int64_t a_col_stride, int64_t panel_ld) {
  constexpr int64_t kBlock = 6;
  int64_t r = 0;
  for (; r + kBlock <= rows; r += kBlock)
    panel_gemm_block<kBlock>(a + r * lda, lda, a_col_stride, panel, panel_ld, K, c + r * ldc, ldc, out, accumulate,
                             bias);
  const float* a_tail = a + r * lda;
  float* c_tail = c + r * ldc;
  const auto block = [&](auto kernel) {
    kernel(a_tail, lda, a_col_stride, panel, panel_ld, K, c_tail, ldc, out, accumulate, bias);
  };
  switch (rows - r) {
    case 5: return block(panel_gemm_block<5>);
    case 4: return block(panel_gemm_block<4>);
    case 3: return block(panel_gemm_block<3>);
    case 2: return block(panel_gemm_block<2>);
    case 1: return block(panel_gemm_block<1>);
    default: return;
  }
}
#else
void panel_gemm(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, const PanelOutput&, bool,
                const float*, int64_t, int64_t) {
  TORCH_CHECK(false, "panel_gemm needs an x86-64 CPU with AVX-512");
}
#endif

namespace {

// panel_gemm_all over P panels [K, 64] at panels + p * panel_stride, rows panel_ld apart.
void strided_panel_gemm_all(const float* a, int64_t lda, int64_t rows, const float* pw, int64_t P, int64_t K,
                            int64_t panel_stride, int64_t panel_ld, float* c, int64_t ldc,
                            PanelOutput (*output)(int64_t, int64_t), int64_t N, bool accumulate, const float* bias,
                            int64_t a_col_stride) {
  // Rows per tile: at most what keeps a tile's slice of `a` in L2 beside the panel, split evenly in multiples of the
  // 6-row block (64 rows as 60 + 4 left a slow 4-row tail to every panel).
  const int64_t max_tile_rows = std::max<int64_t>(6, 512 * 1024 / (4 * std::max<int64_t>(K, 1)));
  const int64_t even_split = std::max<int64_t>(1, (rows + max_tile_rows - 1) / max_tile_rows);
  const int64_t tile_rows = std::max<int64_t>(6, ((rows + even_split - 1) / even_split + 5) / 6 * 6);
  const int64_t row_tiles = (rows + tile_rows - 1) / tile_rows;
  at::parallel_for(0, row_tiles * P, 1, [&](int64_t begin, int64_t end) {
    // A transposed a (a_col_stride > 1) is copied a row tile at a time into a k-major buffer that the tile's panels
    // share: read in place, its columns (a_col_stride apart, often a power-of-two distance) fall into a few cache
    // sets and miss on every row block (measured on [3200, 2048]^T @ [3200, 512]: 173 GFLOP/s in place, 196-202
    // copied).
    std::vector<float> tile_copy(a_col_stride > 1 ? tile_rows * K : 0);
    int64_t copied_r0 = -1;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile / P * tile_rows, p = tile % P, n = std::min(tile_rows, rows - r0);
      const float* a_tile = a + r0 * lda;
      int64_t tile_lda = lda, tile_col_stride = a_col_stride;
      if (a_col_stride > 1) {
        if (copied_r0 != r0) {
          for (int64_t k = 0; k < K; ++k)
            for (int64_t r = 0; r < n; ++r) tile_copy[k * n + r] = a_tile[r * lda + k * a_col_stride];
          copied_r0 = r0;
        }
        a_tile = tile_copy.data();
        tile_lda = 1;
        tile_col_stride = n;
      }
      panel_gemm(a_tile, tile_lda, n, pw + p * panel_stride, K, c + r0 * ldc, ldc, output(p, N), accumulate, bias,
                 tile_col_stride, panel_ld);
    }
  });
}

}  // namespace

void panel_gemm_all(const float* a, int64_t lda, int64_t rows, const at::Tensor& panels, float* c, int64_t ldc,
                    PanelOutput (*output)(int64_t, int64_t), int64_t N, bool accumulate, const float* bias,
                    int64_t a_col_stride) {
  const int64_t K = panels.size(1);
  strided_panel_gemm_all(a, lda, rows, panels.const_data_ptr<float>(), panels.size(0), K, K * 64, 64, c, ldc, output,
                         N, accumulate, bias, a_col_stride);
}

bool column_strips_serve(const at::Tensor& a, const at::Tensor& w) {
  return panel_gemm_supported(a) && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) % 64 == 0 &&
         w.size(0) <= kMaxPanelDepth && reads_weight_in_place(a.size(0));
}

at::Tensor column_strips_product(const at::Tensor& a, const at::Tensor& w) {
  const at::Tensor ac = a.contiguous();
  const int64_t M = ac.size(0), K = w.size(0), N = w.size(1);
  at::Tensor out = at::empty({M, N}, a.options());
  strided_panel_gemm_all(ac.const_data_ptr<float>(), K, M, w.const_data_ptr<float>(), N / 64, K, 64, N,
                         out.data_ptr<float>(), N, column_panel_output, N, /*accumulate=*/false, nullptr, 1);
  return out;
}

void transposed_product_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
  if (!panel_gemm_supported(a) || a.size(0) == 0) {
    if (accumulate) out.addmm_(a.t(), b);
    else at::mm_out(out, a.t(), b);
    return;
  }
  // a is read in place in either layout, so a weight's transpose (w.t()) is never copied.
  const at::Tensor ac = a.stride(0) == 1 || a.stride(1) == 1 ? a : a.contiguous();
  const int64_t K = ac.size(0), M = ac.size(1), N = b.size(1);
  // A deeper product (a weight gradient over all steps of a sequence) runs as even slices of K that each serve.
  const int64_t slices = (K + kMaxPanelDepth - 1) / kMaxPanelDepth, depth = (K + slices - 1) / slices;
  for (int64_t k0 = 0; k0 < K; k0 += depth) {
    const int64_t k = std::min(depth, K - k0);
    const at::Tensor panels = pack_column_panels(b.narrow(0, k0, k));
    panel_gemm_all(ac.const_data_ptr<float>() + k0 * ac.stride(0), ac.stride(1), M, panels, out.data_ptr<float>(), N,
                   column_panel_output, N, accumulate || k0 > 0, nullptr, /*a_col_stride=*/ac.stride(0));
  }
}

at::Tensor transposed_product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(1), b.size(1)}, b.options());
  transposed_product_out(a, b, out, /*accumulate=*/false);
  return out;
}

bool reads_weight_in_place(int64_t rows) { return rows % 64 == 0; }

}  // namespace fastseq2seq
