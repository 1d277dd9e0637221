// Device and runtime facts for the Python side's availability report. Torch-free: only the CUDA
// runtime, so the extension works with any torch build (or none).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace muon_kernels {

struct DeviceQuery {
  int device_count = 0;
  int driver_version = 0;   // CUDA version the installed driver supports (e.g. 13000), 0 = no driver
  int runtime_version = 0;  // CUDA runtime this module was built against
  std::string error;        // cudaGetErrorName of the first failing call, "" when all succeeded
  std::vector<std::pair<int, int>> capabilities;  // (major, minor) per device
  std::vector<std::string> names;
};

DeviceQuery query_devices();

}  // namespace muon_kernels
