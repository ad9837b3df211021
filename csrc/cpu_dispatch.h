// The extension is compiled for baseline x86-64 (SSE2). Hot row loops are written once as FS2S_ROW_INLINE bodies and
// instantiated per instruction set: a baseline entry point and one compiled for AVX2+FMA (some also for AVX-512),
// chosen at run time by what the CPU has (for_this_cpu). The panel GEMM (panel_gemm.h) is AVX-512 code under
// FS2S_TARGET_AVX512, used only where cpu_has_avx512() holds.
#pragma once

#define FS2S_ROW_INLINE [[gnu::always_inline]] inline
#if defined(__x86_64__) && defined(__GNUC__)
#define FS2S_X86
#define FS2S_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FS2S_TARGET_AVX512 __attribute__((target("avx512f,fma")))
namespace fastseq2seq {
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return has;
}
}  // namespace fastseq2seq
#else
#define FS2S_TARGET_AVX2
#define FS2S_TARGET_AVX512
namespace fastseq2seq {
inline bool cpu_has_avx2() { return false; }
inline bool cpu_has_avx512() { return false; }
}  // namespace fastseq2seq
#endif

namespace fastseq2seq {
// The build of a row loop for this CPU: AVX-512, else AVX2+FMA, else baseline.
template <typename F>
F for_this_cpu(F avx512, F avx2, F baseline) {
  return cpu_has_avx512() ? avx512 : cpu_has_avx2() ? avx2 : baseline;
}
}  // namespace fastseq2seq
