#include <cuda_runtime.h>

#include "device.h"

namespace tlfast {
namespace cuda {

int device_count(std::string* why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (why) *why = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  if (count == 0 && why) *why = "no CUDA device is visible";
  return count;
}

}  // namespace cuda
}  // namespace tlfast
