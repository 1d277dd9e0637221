// Compiled by nvcc for every arch in MUON_KERNELS_CUDA_ARCHS, like the kernels that join it.
#include "device_query.h"

#include <cuda_runtime.h>

namespace muon_kernels {

DeviceQuery query_devices() {
  DeviceQuery q;
  cudaRuntimeGetVersion(&q.runtime_version);
  cudaError_t err = cudaDriverGetVersion(&q.driver_version);
  if (err == cudaSuccess) err = cudaGetDeviceCount(&q.device_count);
  if (err != cudaSuccess) {
    q.error = cudaGetErrorName(err);
    q.device_count = 0;
    cudaGetLastError();  // clear it so later runtime calls start clean
    return q;
  }
  for (int d = 0; d < q.device_count; ++d) {
    cudaDeviceProp prop;
    err = cudaGetDeviceProperties(&prop, d);
    if (err != cudaSuccess) {
      q.error = cudaGetErrorName(err);
      cudaGetLastError();
      break;
    }
    q.capabilities.emplace_back(prop.major, prop.minor);
    q.names.emplace_back(prop.name);
  }
  return q;
}

}  // namespace muon_kernels
