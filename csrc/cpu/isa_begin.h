// Switches one instruction set on for the kernel header that the including translation unit
// includes next, and defines the TLFAST_ISA macros that header reads.  The TU defines one of
// TLFAST_BUILD_AVX512 / _AVX2 / _GENERIC first and ends with `#pragma GCC pop_options`.
// The standard headers come first (fused_knn_std.h), so that no library code is compiled for the
// ISA: see that file for why the ISA is a pragma here and never a compiler flag.
#include "fused_knn_std.h"

#pragma GCC push_options
#if defined(TLFAST_BUILD_AVX512)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#define TLFAST_ISA avx512
#define TLFAST_ISA_AVX512 1
#define TLFAST_ISA_AVX2 1
#elif defined(TLFAST_BUILD_AVX2)
#pragma GCC target("avx2,fma,f16c")
#define TLFAST_ISA avx2
#define TLFAST_ISA_AVX512 0
#define TLFAST_ISA_AVX2 1
#elif defined(TLFAST_BUILD_GENERIC)
#define TLFAST_ISA generic
#define TLFAST_ISA_AVX512 0
#define TLFAST_ISA_AVX2 0
#else
#error "define TLFAST_BUILD_AVX512, TLFAST_BUILD_AVX2 or TLFAST_BUILD_GENERIC before including isa_begin.h"
#endif
