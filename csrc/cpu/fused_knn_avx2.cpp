// The fused kNN kernels of fused_knn.h compiled for avx2 (isa_begin.h switches the ISA on).
#define TLFAST_BUILD_AVX2
#include "isa_begin.h"
#include "fused_knn.h"
#pragma GCC pop_options
