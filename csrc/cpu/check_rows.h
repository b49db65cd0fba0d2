// One fused, parallel pass over a matrix that checks the input domain of a metric.
#pragma once
#include <cstdint>

namespace tlfast {
namespace cpu {

enum RowCheck : int { CHECK_FINITE = 1, CHECK_NONZERO = 2, CHECK_SIMPLEX = 4 };
enum RowProblem : int { ROW_OK = 0, ROW_NONFINITE = 1, ROW_ZERO = 2, ROW_NEGATIVE = 3, ROW_SUM = 4 };

struct RowCheckResult {
  int64_t row;      // first offending row, -1 if none
  int problem;      // RowProblem
  double row_sum;   // that row's sum (for ROW_SUM)
  // When no row is bad: max |x| over the matrix and the smallest non-zero row max |x| (inf if
  // none), so that callers see whether float32 products over- or underflow without another pass.
  double max_abs;
  double min_row_max_abs;
};

// checks: a mask of RowCheck; simplex rows must sum to 1 within tol.
template <typename T>
RowCheckResult check_rows(const T* x, int64_t n, int64_t d, int checks, double tol, int threads);

}  // namespace cpu
}  // namespace tlfast
