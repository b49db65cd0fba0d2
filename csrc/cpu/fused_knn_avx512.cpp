// The fused kNN kernels of fused_knn.h compiled for avx512 (isa_begin.h switches the ISA on).
#define TLFAST_BUILD_AVX512
#include "isa_begin.h"
#include "fused_knn.h"
#pragma GCC pop_options
