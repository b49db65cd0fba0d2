// The Gram product of gram_kernel.h compiled for generic.  The instruction set is switched on here,
// after the standard headers, so that no library code is compiled for it (see fused_knn_std.h).
#include "fused_knn_std.h"
#define TLFAST_ISA generic
#define TLFAST_ISA_AVX512 0
#define TLFAST_ISA_AVX2 0
#include "gram_kernel.h"
