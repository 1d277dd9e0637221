// The one file that talks to Python. Entry points take plain values (and, as kernels land, raw
// device pointers as uintptr_t plus an explicit cudaStream_t), so the module never links torch.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "device_query.h"

#ifndef MUON_KERNELS_CUDA_ARCHS
#error "MUON_KERNELS_CUDA_ARCHS must be defined by the build (CMakeLists.txt)"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "muon_kernels CUDA extension (torch-free; CUDA runtime only)";
  m.def("build_info", [] {
    py::dict info;
    info["archs"] = MUON_KERNELS_CUDA_ARCHS;
    info["cuda_version"] = CUDART_VERSION;
    return info;
  }, "The CUDA archs and runtime version this module was compiled for.");
  m.def("device_query", [] {
    muon_kernels::DeviceQuery q = muon_kernels::query_devices();
    py::dict out;
    out["device_count"] = q.device_count;
    out["driver_version"] = q.driver_version;
    out["runtime_version"] = q.runtime_version;
    out["error"] = q.error;
    out["capabilities"] = q.capabilities;
    out["names"] = q.names;
    return out;
  }, "Device count, driver/runtime versions and compute capabilities, or the CUDA error that prevented them.");
}
