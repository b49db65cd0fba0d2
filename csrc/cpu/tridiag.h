// Quadratic forms in the resolvent of a symmetric tridiagonal matrix, for many shifts at once
// (tlfast.transferability: LogME's evidence in the Householder basis of FᵀF, without its
// eigenvectors).  float64 throughout.
#pragma once
#include <cstdint>

namespace tlfast {
namespace cpu {

// T is the d x d symmetric tridiagonal matrix with diagonal diag (d) and off-diagonal off (d - 1);
// u is (d, cols), row-major (column j of u is the vector of shift lam[j]).  For every j, with
// A_j = T + lam[j] I factored as L D Lᵀ (no pivoting) and x_j = A_j⁻¹ u_j:
//     q1[j] = u_jᵀ A_j⁻¹ u_j,   and, when q2 and q3 are not null,
//     q2[j] = x_jᵀ x_j,          q3[j] = x_jᵀ A_j⁻¹ x_j.
// Returns false (the outputs then unspecified) when some pivot of D is not positive and finite:
// some A_j is not (numerically) positive definite - by Sylvester's law, the count of non-positive
// pivots is the count of eigenvalues of T at or below -lam[j].  O(d · cols), scratch of 3 · d · 64
// doubles.
bool tridiag_resolvent_forms(const double* diag, const double* off, int64_t d, const double* u, int64_t cols,
                             const double* lam, double* q1, double* q2, double* q3);

}  // namespace cpu
}  // namespace tlfast
