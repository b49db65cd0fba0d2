#include <cuda_runtime.h>

#include "preprocess.h"

namespace tlfast {
namespace cuda {

namespace {

struct Affine {
  float scale[kMaxChannels];
  float shift[kMaxChannels];
};

// One thread per output element, grid-stride: consecutive threads write consecutive floats of
// one NCHW plane (coalesced 128-byte stores) and read bytes `sw` apart from the same rows, which
// the L1/L2 caches serve for the `channels` planes that share them.  The affine constants travel
// by value in the kernel's parameter space, so no device allocation or copy is needed.
__global__ void image_preprocess_kernel(const uint8_t* __restrict__ x, int64_t total, int64_t height,
                                        int64_t width, int64_t channels, int64_t sn, int64_t sh, int64_t sw,
                                        int64_t sc, Affine affine, float* __restrict__ out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = e % width;
    const int64_t h = (e / width) % height;
    const int64_t c = (e / (width * height)) % channels;
    const int64_t i = e / (width * height * channels);
    const float v = static_cast<float>(x[i * sn + h * sh + w * sw + c * sc]);
    out[e] = fmaf(v, affine.scale[c], affine.shift[c]);
  }
}

}  // namespace

std::string image_preprocess(const uint8_t* x, int64_t n, int64_t height, int64_t width, int64_t channels,
                             int64_t sn, int64_t sh, int64_t sw, int64_t sc, const float* scale,
                             const float* shift, uintptr_t stream, float* out) {
  if (channels < 1 || channels > kMaxChannels) return "channels must be in [1, 4]";
  const int64_t total = n * channels * height * width;
  if (total == 0) return "";
  Affine affine{};
  for (int64_t c = 0; c < channels; ++c) {
    affine.scale[c] = scale[c];
    affine.shift[c] = shift[c];
  }
  constexpr int kThreads = 256;
  // Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  image_preprocess_kernel<<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      x, total, height, width, channels, sn, sh, sw, sc, affine, out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace tlfast
