// Runtime dispatch of the fused Sinkhorn tile pass to the instruction set knn.cpp picked.
#include "sinkhorn.h"

#include <string>

#include "knn.h"

namespace tlfast {
namespace cpu {

void lse_rows(const float* u, int64_t n, const float* v, int64_t m, int64_t d, float scale, const float* beta,
              float alpha, const float* cost_col, int threads, float* out_lse, float* out_cost) {
  static const std::string best = isa();
  if (best == "avx512") return avx512::lse_rows(u, n, v, m, d, scale, beta, alpha, cost_col, threads, out_lse, out_cost);
  if (best == "avx2") return avx2::lse_rows(u, n, v, m, d, scale, beta, alpha, cost_col, threads, out_lse, out_cost);
  return generic::lse_rows(u, n, v, m, d, scale, beta, alpha, cost_col, threads, out_lse, out_cost);
}

}  // namespace cpu
}  // namespace tlfast
