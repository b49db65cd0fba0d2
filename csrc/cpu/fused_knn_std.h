// Every header the kernels use, included before the ISA-specific code so that it is compiled for
// the baseline instruction set.  The library templates they instantiate (std::vector<float> and
// the like) are weak symbols the linker merges across translation units, keeping one copy: if they
// were compiled with this TU's ISA, the AVX-512 copy could end up called from the AVX2 or generic
// kernels and kill the process with SIGILL on a CPU without AVX-512.  So the ISA is switched on
// with `#pragma GCC target` after these includes (fused_knn_<isa>.cpp), never by command-line flags.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "knn.h"
