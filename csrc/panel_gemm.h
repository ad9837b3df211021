// The recurrent products of the CPU LSTM loops as one small AVX-512 GEMM that the loops call per thread and per step:
// c[rows, panel] (+)= a[rows, K] @ panel[K, 64]. The weight is packed once per call into panels of 64 columns, each
// K x 64 and contiguous; a thread that owns a few panels keeps them in its cache over all steps, and its step is one
// pass over them, a block of up to 6 rows x 64 results held in 24 registers. On the AMD EPYC (AVX-512) development
// machine, one thread, [rows, 512] @ [512, 2048]: 92 GFLOP/s at 8 rows where MKL's sgemm reaches 58, 108 at 64
// rows against MKL's 92.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace fastseq2seq {

// Where the four 16-column chunks of a panel land in a row of c, and which lanes of each are real (padding columns
// of the last panel are not stored).
struct PanelOutput {
  int64_t offset[4];
  uint16_t lanes[4];
};

// fp32 on a CPU with AVX-512 (t on the CPU).
bool panel_gemm_supported(const at::Tensor& t);

// The deepest product the panels serve well: a panel [K, 64] stays in L2 while a tile's rows stream over it (the
// kernel does not block K); transposed_product runs deeper products in slices of K, the other entry points leave
// them to MKL.
constexpr int64_t kMaxPanelDepth = 2048;

// The panels of w^T [K, 4H] for a gate weight w [4H, K] (forward: x @ w_ih^T, h_{t-1} @ w_hh^T) with the columns
// reordered so that panel p holds the four gates of hidden units 16p..16p+15: [ceil(H/16), K, 64]. Its results land
// in a gates row (stride 4H) at gate_panel_output(p, H).
at::Tensor pack_gate_panels(const at::Tensor& w);
PanelOutput gate_panel_output(int64_t panel, int64_t H);

// The panels of w^T [K, N] for a linear layer's weight w [N, K] (x @ w^T): [ceil(N/64), K, 64]; panel p holds rows
// 64p..64p+63 of w, landing at column_panel_output(p, N).
at::Tensor pack_row_panels(const at::Tensor& w);

// The panels of w [K, N] as it is (backward: grad_gates @ w_hh): [ceil(N/64), K, 64]; panel p holds columns
// 64p..64p+63, landing at column_panel_output(p, N).
at::Tensor pack_column_panels(const at::Tensor& w);
PanelOutput column_panel_output(int64_t panel, int64_t N);

// c[r, out] = a[r, :K] @ panel (+ c[r, out] if accumulate) (+ bias[out] if bias) for r < rows; a[r, k] at
// a[r * lda + k * a_col_stride] (a_col_stride > 1: a transposed operand such as grad_gates^T), c row-major with
// leading dimension ldc, bias laid out like a row of c.
// panel_ld: the distance between a panel's rows (64 when packed).
void panel_gemm(const float* a, int64_t lda, int64_t rows, const float* panel, int64_t K, float* c, int64_t ldc,
                const PanelOutput& out, bool accumulate, const float* bias = nullptr, int64_t a_col_stride = 1,
                int64_t panel_ld = 64);

// The same over all rows and all panels [P, K, 64] of one packed weight, in parallel over tiles of rows x panels
// (each tile's rows and panel fit in a core's L2); output(p, N) places panel p.
void panel_gemm_all(const float* a, int64_t lda, int64_t rows, const at::Tensor& panels, float* c, int64_t ldc,
                    PanelOutput (*output)(int64_t, int64_t), int64_t N, bool accumulate, const float* bias = nullptr,
                    int64_t a_col_stride = 1);

// a^T @ b for a [K, M] and b [K, N]: a weight's gradient, grad^T @ x, for a batch of rows; or, with a = w^T, the
// transpose of a product x @ w^T; or, with a = g^T, the product g @ b. In fp32 on a CPU with AVX-512, b's columns
// packed into panels here (K in slices of at most kMaxPanelDepth) and a read in place (either layout: a weight's
// transpose is not copied); else at::mm. The _out form writes (or adds to) a contiguous out [M, N].
at::Tensor transposed_product(const at::Tensor& a, const at::Tensor& b);
void transposed_product_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate);

// a [M, K] @ w [K, N] with w read in place, its columns in strips of 64 (each K x 64, rows N apart) taken as
// panels: for a weight used once, which packing would read and write whole. Serves when M and N are multiples of 64,
// w is contiguous and K <= kMaxPanelDepth, in fp32 on AVX-512.
bool column_strips_serve(const at::Tensor& a, const at::Tensor& w);
at::Tensor column_strips_product(const at::Tensor& a, const at::Tensor& w);

// Whether a product of `rows` rows with a weight used once (outside a constant-weights scope) reads the weight in
// place (transposed_product with a = w^T, column_strips_product) rather than have MKL pack it: for multiples of 64
// rows, which fill the panels of the rows; measured at 64 to 256 rows.
bool reads_weight_in_place(int64_t rows);

}  // namespace fastseq2seq
