// Fused image preprocessing: uint8 pixels -> normalised float32 NCHW, in one pass.
#pragma once
#include <cstdint>

namespace tlfast {
namespace cpu {

// out[n, c, h, w] = x[n, h, w, c] * scale[c] + shift[c]  with  scale = 1 / (255 std),
// shift = -mean / std, i.e. (x / 255 - mean) / std.  The input is addressed through element
// strides (sn, sh, sw, sc), so NHWC, NCHW and cropped views are read in place; out is a
// contiguous (n, channels, height, width) float32 buffer.
void image_preprocess(const uint8_t* x, int64_t n, int64_t height, int64_t width, int64_t channels,
                      int64_t sn, int64_t sh, int64_t sw, int64_t sc, const float* scale, const float* shift,
                      int threads, float* out);

}  // namespace cpu
}  // namespace tlfast
