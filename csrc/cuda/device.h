// CUDA runtime queries.  Declared unconditionally; defined in device.cu when the CUDA part is built.
#pragma once
#include <string>

namespace tlfast {
namespace cuda {

// Number of CUDA devices, or 0 with the runtime's reason in *why (no driver, no device, ...).
int device_count(std::string* why);

}  // namespace cuda
}  // namespace tlfast
