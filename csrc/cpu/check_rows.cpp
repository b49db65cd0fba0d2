#include "check_rows.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

namespace tlfast {
namespace cpu {

template <typename T>
static int row_problem(const T* x, int64_t d, int checks, double tol, double* sum_out, double* max_abs_out) {
  // x - x is 0 for finite x and NaN otherwise, so one sum screens for NaN / inf; the reductions
  // are declared to OpenMP so that the loop vectorises.
  T nonfinite = 0, max_abs = 0, min_v = x[0];
  double sum = 0.0;
#pragma omp simd reduction(+ : nonfinite, sum) reduction(max : max_abs) reduction(min : min_v)
  for (int64_t t = 0; t < d; ++t) {
    const T v = x[t];
    nonfinite += v - v;
    max_abs = std::max<T>(max_abs, std::fabs(v));
    min_v = std::min<T>(min_v, v);
    sum += v;
  }
  *sum_out = sum;
  *max_abs_out = max_abs;
  if ((checks & CHECK_FINITE) && nonfinite != 0) return ROW_NONFINITE;  // NaN != 0 is true
  if ((checks & CHECK_NONZERO) && max_abs == 0) return ROW_ZERO;
  if (checks & CHECK_SIMPLEX) {
    if (min_v < 0) return ROW_NEGATIVE;
    if (!(std::fabs(sum - 1.0) <= tol)) return ROW_SUM;
  }
  return ROW_OK;
}

template <typename T>
RowCheckResult check_rows(const T* x, int64_t n, int64_t d, int checks, double tol, int threads) {
  int64_t first = n;
  double max_abs = 0.0, min_row_max_abs = INFINITY;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(min : first, min_row_max_abs) \
    reduction(max : max_abs)
  for (int64_t r = 0; r < n; ++r) {
    if (r >= first) continue;
    double s, m;
    if (row_problem(x + r * d, d, checks, tol, &s, &m) != ROW_OK) first = std::min(first, r);
    max_abs = std::max(max_abs, m);
    if (m > 0) min_row_max_abs = std::min(min_row_max_abs, m);
  }
  if (first == n) return {-1, ROW_OK, 0.0, max_abs, min_row_max_abs};
  double s, m;
  const int problem = row_problem(x + first * d, d, checks, tol, &s, &m);
  return {first, problem, s, 0.0, 0.0};
}

template RowCheckResult check_rows<float>(const float*, int64_t, int64_t, int, double, int);
template RowCheckResult check_rows<double>(const double*, int64_t, int64_t, int, double, int);

}  // namespace cpu
}  // namespace tlfast
