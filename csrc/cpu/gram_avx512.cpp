// The Gram product of gram_kernel.h compiled for avx512.  The instruction set is switched on here,
// after the standard headers, so that no library code is compiled for it (see fused_knn_std.h).
#include "fused_knn_std.h"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define TLFAST_ISA avx512
#define TLFAST_ISA_AVX512 1
#define TLFAST_ISA_AVX2 1
#include "gram_kernel.h"
#pragma GCC pop_options
