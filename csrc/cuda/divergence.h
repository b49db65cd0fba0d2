// KL and Jensen-Shannon divergence tiles on the GPU, computed directly (no product form).
#pragma once
#include <cstdint>

namespace tlfast {
namespace cuda {

enum class Divergence : int { KL = 3, JS = 4 };   // the codes of tlfast/metrics.py
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// out[i, j] (row stride ldo, float32) = KL(q_i || c_j) or JS(q_i, c_j) for the rows of q [nq, d]
// (row stride ldq) and c [n, d] (row stride ldc), both of `dtype`, natural log.  KL is +inf where
// q > 0 meets c == 0 and 0 log 0 = 0 throughout.  Runs on `stream` without synchronising.
void divergence_tile(const void* q, int64_t ldq, int64_t nq, const void* c, int64_t ldc, int64_t n, int64_t d,
                     DType dtype, Divergence metric, float* out, int64_t ldo, uintptr_t stream);

}  // namespace cuda
}  // namespace tlfast
