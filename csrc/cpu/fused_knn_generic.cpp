// The fused kernels of fused_knn.h compiled for generic (flags set in CMakeLists.txt).
#define TLFAST_ISA generic
#include "fused_knn.h"
