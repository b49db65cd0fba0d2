// CPU entry point of the Gram product AᵀA (tlfast.transferability): the sufficient statistic of
// every feature-based transferability score.  Input float32, row-major, contiguous.
#pragma once
#include <cstdint>

namespace tlfast {
namespace cpu {

// g ((d, d), float64, row-major) += BᵀB for B = a - 1 shiftᵀ (a (n, d); shift (d) or nullptr for
// none), on and above the diagonal: every register tile that holds an entry with column >= row is
// added (so a few entries just below the diagonal are written too, with their true values); tiles
// wholly below it are left as they were.  The products are summed in float32 over at most 512 rows
// (in registers), then in float64, and g is written once, at the end.  About half of a full GEMM's
// flops (gram_kernel.h); scratch of about d²/2 doubles besides the packed slice.
//
// With codes (n, values in [0, classes)) and sums ((classes, d), float64, row-major), also
// sums[codes[i]] += B[i] for every row, from the rows as they are packed: float32 per thread over at
// most 8192 rows, then float64; scratch of threads x classes x d floats.  Returns false (having
// skipped those rows' sums) when some code is outside [0, classes).
bool gram_upper_add(const float* a, int64_t n, int64_t d, int threads, double* g, const float* shift = nullptr,
                    const int64_t* codes = nullptr, int64_t classes = 0, double* sums = nullptr);

#define TLFAST_DECLARE_GRAM_ISA(ns) \
  namespace ns {                    \
  bool gram_upper_add(const float*, int64_t, int64_t, int, double*, const float*, const int64_t*, int64_t, double*); \
  }
TLFAST_DECLARE_GRAM_ISA(avx512)
TLFAST_DECLARE_GRAM_ISA(avx2)
TLFAST_DECLARE_GRAM_ISA(generic)
#undef TLFAST_DECLARE_GRAM_ISA

}  // namespace cpu
}  // namespace tlfast
