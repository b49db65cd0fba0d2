// Fused masked mean-pool + L2-normalise over a token (or time) axis, on the CPU.
#pragma once
#include <cstdint>

namespace tlfast {
namespace cpu {

// out[b, :] = v / max(||v||, 1e-12) (or v itself when normalize is false), where
//   v = sum_t mask[b, t] * x[b, t, :] / max(sum_t mask[b, t], 1e-9)
// x: (batch, steps, dim) float32, row-major and contiguous; mask: (batch, steps) int64, any
// non-zero entry counts as 1 (tokenizer attention masks are 0/1).  The clamps are the ones
// sentence-transformers uses, so an all-padding row gives zeros instead of NaN.
void masked_mean_pool(const float* x, const int64_t* mask, int64_t batch, int64_t steps, int64_t dim,
                      bool normalize, int threads, float* out);

}  // namespace cpu
}  // namespace tlfast
