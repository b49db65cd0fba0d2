// The fused kernels of fused_knn.h compiled for avx2 (flags set in CMakeLists.txt).
#define TLFAST_ISA avx2
#include "fused_knn.h"
