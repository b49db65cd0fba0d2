// The Gram product of gram_kernel.h compiled for avx2.  The instruction set is switched on here,
// after the standard headers, so that no library code is compiled for it (see fused_knn_std.h).
#include "fused_knn_std.h"
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TLFAST_ISA avx2
#define TLFAST_ISA_AVX512 0
#define TLFAST_ISA_AVX2 1
#include "gram_kernel.h"
#pragma GCC pop_options
