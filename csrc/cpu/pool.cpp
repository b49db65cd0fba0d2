#include "pool.h"

#include <omp.h>

#include <cmath>
#include <vector>

namespace tlfast {
namespace cpu {

// One pass over x: each row of the batch is read once, summed into a float32 accumulator
// (the output row itself), scaled, and normalised while still in cache.  The plain torch form,
//   (x * m[..., None]).sum(1) / m.sum(1).clamp_min(1e-9)  then  F.normalize,
// materialises the (batch, steps, dim) product and reads the pooled rows twice more.
void masked_mean_pool(const float* x, const int64_t* mask, int64_t batch, int64_t steps, int64_t dim,
                      bool normalize, int threads, float* out) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    float* o = out + b * dim;
    for (int64_t j = 0; j < dim; ++j) o[j] = 0.0f;
    int64_t count = 0;
    for (int64_t t = 0; t < steps; ++t) {
      if (mask[b * steps + t] == 0) continue;
      ++count;
      const float* row = x + (b * steps + t) * dim;
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) o[j] += row[j];
    }
    const float inv_count = 1.0f / std::fmax(static_cast<float>(count), 1e-9f);
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < dim; ++j) {
      o[j] *= inv_count;
      sq += o[j] * o[j];
    }
    if (normalize) {
      const float inv_norm = 1.0f / std::fmax(std::sqrt(sq), 1e-12f);
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) o[j] *= inv_norm;
    }
  }
}

}  // namespace cpu
}  // namespace tlfast
