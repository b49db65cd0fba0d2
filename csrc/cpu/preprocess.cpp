#include "preprocess.h"

#include <omp.h>

namespace tlfast {
namespace cpu {

// Parallel over (image, channel, row): each task writes one contiguous output row and reads one
// input row, so writes stream and the uint8 -> float conversion, scaling and transpose happen in
// registers; torch's x.permute(0, 3, 1, 2).float().div(255).sub(mean).div(std) makes three full
// float32 passes instead.
void image_preprocess(const uint8_t* x, int64_t n, int64_t height, int64_t width, int64_t channels,
                      int64_t sn, int64_t sh, int64_t sw, int64_t sc, const float* scale, const float* shift,
                      int threads, float* out) {
  const int64_t rows = n * channels * height;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = r % height;
    const int64_t c = (r / height) % channels;
    const int64_t i = r / (height * channels);
    const uint8_t* src = x + i * sn + h * sh + c * sc;
    float* dst = out + r * width;
    const float a = scale[c], b = shift[c];
    if (sw == 1) {
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) dst[w] = static_cast<float>(src[w]) * a + b;
    } else {
      for (int64_t w = 0; w < width; ++w) dst[w] = static_cast<float>(src[w * sw]) * a + b;
    }
  }
}

}  // namespace cpu
}  // namespace tlfast
