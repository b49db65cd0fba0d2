#include <cuda_runtime.h>

#include <stdexcept>

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

void check_device_pointer(const void* p, const char* name) {
  if (p == nullptr) throw std::invalid_argument(std::string(name) + " is a null pointer");
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::invalid_argument(std::string(name) + ": " + cudaGetErrorString(err));
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string(name) + " is not CUDA device memory; pass tensor.data_ptr() of a CUDA tensor");
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(kernel) + " launch failed: " + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace tlfast
