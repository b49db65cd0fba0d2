// Runtime dispatch of the Gram product to the instruction set knn.cpp picked.
#include "gram.h"

#include <string>

#include "knn.h"

namespace tlfast {
namespace cpu {

bool gram_upper_add(const float* a, int64_t n, int64_t d, int threads, double* g, const float* shift,
                    const int64_t* codes, int64_t classes, double* sums) {
  static const std::string best = isa();
  if (best == "avx512") return avx512::gram_upper_add(a, n, d, threads, g, shift, codes, classes, sums);
  if (best == "avx2") return avx2::gram_upper_add(a, n, d, threads, g, shift, codes, classes, sums);
  return generic::gram_upper_add(a, n, d, threads, g, shift, codes, classes, sums);
}

}  // namespace cpu
}  // namespace tlfast
