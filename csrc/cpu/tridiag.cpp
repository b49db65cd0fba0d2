#include "tridiag.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace tlfast {
namespace cpu {

namespace {
constexpr int64_t kBlock = 64;  // columns per pass: the recurrences run across them in SIMD lanes
}

bool tridiag_resolvent_forms(const double* diag, const double* off, int64_t d, const double* u, int64_t cols,
                             const double* lam, double* q1, double* q2, double* q3) {
  if (d < 1 || cols < 1) return d >= 1;
  const bool more = q2 != nullptr && q3 != nullptr;
  // Per block of columns: ld = 1 / D_i, el = L_i (the multiplier of row i), y = L⁻¹u (then x).
  std::vector<double> ld(static_cast<size_t>(d) * kBlock), el(static_cast<size_t>(d) * kBlock),
      y(static_cast<size_t>(d) * kBlock);
  double s1[kBlock], s2[kBlock], s3[kBlock], w[kBlock];
  bool ok = true;
  for (int64_t j0 = 0; j0 < cols && ok; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, cols - j0);
    const double* lj = lam + j0;
    // Forward: D_0 = a_0 + λ, L_i = b_{i-1} / D_{i-1}, D_i = a_i + λ - L_i b_{i-1}; y = L⁻¹u; q1 = Σ y²/D.
    int bad = 0;
    for (int64_t c = 0; c < nb; ++c) {
      const double p = diag[0] + lj[c];
      bad |= !(p > 0 && p <= 1.7976931348623157e308);
      const double r = 1.0 / p, v = u[j0 + c];
      ld[c] = r;
      el[c] = 0.0;
      y[c] = v;
      s1[c] = v * v * r;
    }
    for (int64_t i = 1; i < d; ++i) {
      const double b = off[i - 1], a = diag[i];
      const double* ldp = &ld[(i - 1) * kBlock];
      const double* yp = &y[(i - 1) * kBlock];
      double* ldi = &ld[i * kBlock];
      double* eli = &el[i * kBlock];
      double* yi = &y[i * kBlock];
      const double* ui = u + i * cols + j0;
#pragma omp simd reduction(| : bad)
      for (int64_t c = 0; c < nb; ++c) {
        const double l = b * ldp[c];
        const double p = a + lj[c] - l * b;
        bad |= !(p > 0 && p <= 1.7976931348623157e308);
        const double r = 1.0 / p, v = ui[c] - l * yp[c];
        ldi[c] = r;
        eli[c] = l;
        yi[c] = v;
        s1[c] += v * v * r;
      }
    }
    if (bad) {
      ok = false;
      break;
    }
    for (int64_t c = 0; c < nb; ++c) q1[j0 + c] = s1[c];
    if (!more) continue;
    // Back: x_{d-1} = y_{d-1} / D_{d-1}, x_i = y_i / D_i - L_{i+1} x_{i+1} (in place of y); q2 = Σ x².
    for (int64_t c = 0; c < nb; ++c) {
      double* yl = &y[(d - 1) * kBlock];
      yl[c] *= ld[(d - 1) * kBlock + c];
      s2[c] = yl[c] * yl[c];
    }
    for (int64_t i = d - 2; i >= 0; --i) {
      const double* xn = &y[(i + 1) * kBlock];
      const double* eln = &el[(i + 1) * kBlock];
      const double* ldi = &ld[i * kBlock];
      double* xi = &y[i * kBlock];
#pragma omp simd
      for (int64_t c = 0; c < nb; ++c) {
        const double v = xi[c] * ldi[c] - eln[c] * xn[c];
        xi[c] = v;
        s2[c] += v * v;
      }
    }
    // Forward again on x: w = L⁻¹x, q3 = Σ w²/D.
    for (int64_t c = 0; c < nb; ++c) {
      w[c] = y[c];
      s3[c] = w[c] * w[c] * ld[c];
    }
    for (int64_t i = 1; i < d; ++i) {
      const double* xi = &y[i * kBlock];
      const double* eli = &el[i * kBlock];
      const double* ldi = &ld[i * kBlock];
#pragma omp simd
      for (int64_t c = 0; c < nb; ++c) {
        const double v = xi[c] - eli[c] * w[c];
        w[c] = v;
        s3[c] += v * v * ldi[c];
      }
    }
    for (int64_t c = 0; c < nb; ++c) {
      q2[j0 + c] = s2[c];
      q3[j0 + c] = s3[c];
    }
  }
  return ok;
}

}  // namespace cpu
}  // namespace tlfast
