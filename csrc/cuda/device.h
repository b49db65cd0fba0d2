// CUDA runtime queries and checks.  Declared unconditionally; defined in device.cu when the CUDA
// part is built.
#pragma once
#include <string>

namespace tlfast {
namespace cuda {

// Number of CUDA devices, or 0 with the runtime's reason in *why (no driver, no device, ...).
int device_count(std::string* why);

// Throws std::invalid_argument unless p is device (or managed) memory the runtime knows about, so
// that a wrong pointer from Python raises instead of faulting inside a kernel.
void check_device_pointer(const void* p, const char* name);

// Throws std::runtime_error with the launch error of the kernel just queued, if any.
void check_launch(const char* kernel);

}  // namespace cuda
}  // namespace tlfast
