// The fused kernels of fused_knn.h compiled for avx512 (flags set in CMakeLists.txt).
#define TLFAST_ISA avx512
#include "fused_knn.h"
