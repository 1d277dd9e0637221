// Device helpers shared by the kernels: element conversions, cp.async, the tile table, and the
// dtype dispatch that turns a runtime DType into a template argument.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels.h"

namespace muon_kernels {

// ---- element conversions (all arithmetic is fp32; stores round to nearest even) -------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Round through T and back: the value a torch op on T tensors would leave behind.
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// torch's lerp, branch for branch (it switches formula at |w| = 0.5 for accuracy).
__device__ __forceinline__ float lerp(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.f - w);
}

// ---- the tile table ---------------------------------------------------------------------------
// One row per code path. 8 warps as 2×4, each warp a 64×32 tile of 16×16×16 mma fragments.
// sm_75 has 64 KB of shared memory per block and no cp.async: 2 stages staged through registers.
// sm_80+ (A100 164 KB, sm_86/89 100 KB, H100 228 KB) take 3 cp.async stages (60 KB).
template <CodePath PATH>
struct TensorCoreTiles {
  static constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 32;
  static constexpr int kWarpsM = 2, kWarpsN = 4;
  static constexpr int kStages = PATH == CodePath::kSm80 ? 3 : 2;
  static constexpr bool kAsync = PATH == CodePath::kSm80;
  // 0: no occupancy hint (a hint of 1 lets ptxas take 255 registers, and it then spills).
  static constexpr int kMinBlocksPerSM = 0;
};
// fp32 (ieee) runs on the FMA units: 16×16 threads, each an 8×8 register tile of a 128×128 block.
// Two 256-thread blocks per SM cap it at 128 registers per thread (65536 / 512): without the cap
// ptxas used 129 on sm_80, one too many for a second block.
struct SimtTiles {
  static constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 8;
  static constexpr int kThreads = 256, kPerThread = 8, kMinBlocksPerSM = 2;
};
static_assert(kPad % TensorCoreTiles<CodePath::kSm80>::kBlockM == 0 && kPad % SimtTiles::kBlockM == 0,
              "kPad must be a multiple of every tile edge");

// Grids put the batch on y, whose limit is 65535: launchers split larger batches.
constexpr int64_t kMaxGridY = 65535;

// ---- cp.async (sm_80+) -----------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // "memory": the compiler must not move shared-memory accesses across the copy, the commit or the
  // wait (ordering must not rest on the surrounding barriers alone).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  __trap();  // never launched: the host picks the sm75 path below sm_80
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// True in device code compiled for an arch that can run (T, PATH): bf16 mma and cp.async need
// sm_80 (fp32 runs on the FMA units everywhere). Kernels compiled for an older arch replace their body with a trap; the host never
// launches them there (it checks the device's capability first).
template <typename T, CodePath PATH>
__device__ constexpr bool arch_supports() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return std::is_same<T, float>::value ||
         (PATH == CodePath::kSm75 && !std::is_same<T, __nv_bfloat16>::value);
#else
  return true;
#endif
}

// ---- host helpers ------------------------------------------------------------------------------
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("muon_kernels._C.") + what + ": launch failed: " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
  }
}

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

inline void require_dtype(DType dtype, const char* what) {
  const int code = static_cast<int>(dtype);
  require(code >= 0 && code <= 2, std::string(what) + ": unknown dtype code " + std::to_string(code) +
                                      " (0 = float32, 1 = float16, 2 = bfloat16)");
}

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, const char* what, F&& f) {
  require_dtype(dtype, what);
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(__half{}); return;
    case DType::kBFloat16: f(__nv_bfloat16{}); return;
  }
}

}  // namespace muon_kernels
