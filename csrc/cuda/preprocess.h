// Fused image preprocessing on the GPU: uint8 pixels -> normalised float32 NCHW, in one pass.
// Declared unconditionally; defined in preprocess.cu when the CUDA part is built.
#pragma once
#include <cstdint>
#include <string>

namespace tlfast {
namespace cuda {

// Same maths and stride convention as tlfast::cpu::image_preprocess; x and out are device
// pointers, scale/shift are host arrays of `channels` floats (at most kMaxChannels), and the
// kernel is queued on `stream` (a cudaStream_t passed as an integer, 0 = legacy default stream).
// Returns an empty string on success, the CUDA error otherwise.
constexpr int kMaxChannels = 4;
std::string image_preprocess(const uint8_t* x, int64_t n, int64_t height, int64_t width, int64_t channels,
                             int64_t sn, int64_t sh, int64_t sw, int64_t sc, const float* scale,
                             const float* shift, uintptr_t stream, float* out);

}  // namespace cuda
}  // namespace tlfast
