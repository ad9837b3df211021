// The extension is compiled for baseline x86-64 (SSE2). Hot row loops are written once as FS2S_ROW_INLINE bodies and
// instantiated twice: a baseline entry point and one compiled for AVX2+FMA, chosen at run time when the CPU has it.
// The panel GEMM (panel_gemm.h) is AVX-512 code under FS2S_TARGET_AVX512, used only where cpu_has_avx512() holds.
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
namespace fastseq2seq {
inline bool cpu_has_avx2() { return false; }
inline bool cpu_has_avx512() { return false; }
}  // namespace fastseq2seq
#endif
