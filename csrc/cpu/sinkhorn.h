// CPU entry point of the fused Sinkhorn tile pass (tlfast.ot): a row-wise log-sum-exp over biased
// dot products, never holding the (n, m) matrix.  Inputs are float32, row-major, contiguous.
#pragma once
#include <cstdint>

namespace tlfast {
namespace cpu {

// For every row i of u (n, d), over the rows j of v (m, d):
//   z_ij       = scale * <u_i, v_j> + beta_j
//   out_lse[i] = log sum_j exp(z_ij)
// and, when out_cost is not null, the softmax-weighted mean of the affine cost
//   out_cost[i] = sum_j exp(z_ij - out_lse[i]) * (alpha * <u_i, v_j> + cost_col[j])
// Every Sinkhorn cost is C_ij = alpha <u_i, v_j> + p_i + q_j (tlfast/ot.py), so one kernel serves
// both half-iterations (the column pass swaps u and v) and the final transport cost.
void lse_rows(const float* u, int64_t n, const float* v, int64_t m, int64_t d, float scale, const float* beta,
              float alpha, const float* cost_col, int threads, float* out_lse, float* out_cost);

#define TLFAST_DECLARE_LSE_ISA(ns)                                                                            \
  namespace ns {                                                                                              \
  void lse_rows(const float*, int64_t, const float*, int64_t, int64_t, float, const float*, float,           \
                const float*, int, float*, float*);                                                           \
  }
TLFAST_DECLARE_LSE_ISA(avx512)
TLFAST_DECLARE_LSE_ISA(avx2)
TLFAST_DECLARE_LSE_ISA(generic)
#undef TLFAST_DECLARE_LSE_ISA

}  // namespace cpu
}  // namespace tlfast
