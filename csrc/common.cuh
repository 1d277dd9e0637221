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
// One row per code path: 128×128 blocks of 4 warps as 2×2, each warp a 64×64 tile (4 m16 × 8 n8
// mma fragments, 128 fp32 accumulators per thread), k in steps of 32. Per 16-wide k step a warp
// issues 8 ldmatrix.x4 for 32 mma: twice the mma per shared load of 64×32 warp tiles.
// 16 KB of operands per stage: sm_80+ takes 3 cp.async stages (48 KB), so two blocks fit in the
// shared memory of every sm_80+ SM (sm_86/89 have 100 KB) and one block's barrier wait overlaps
// the other's mma. sm_75 (64 KB per SM, no cp.async): 2 stages staged through registers.
template <CodePath PATH>
struct TensorCoreTiles {
  static constexpr int kBlockM = 128, kBlockN = 128, kBlockK = 32;
  static constexpr int kWarpsM = 2, kWarpsN = 2;
  static constexpr int kStages = PATH == CodePath::kSm80 ? 3 : 2;
  static constexpr bool kAsync = PATH == CodePath::kSm80;
  // Two blocks per SM: caps ptxas at 255 registers per thread (65536 / 256), which the 128
  // accumulators, 24 fragment registers and the addresses fit without spilling.
  static constexpr int kMinBlocksPerSM = 2;
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
constexpr int64_t kMaxGridX = 2147483647;

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

// ---- ldmatrix and mma.sync (sm_75+) -------------------------------------------------------------
// Four 8×8 16-bit matrices from shared memory, each lane handing over one row address (see
// tile::ldmatrix_x4_source); TRANS delivers each matrix transposed. "memory": the loads must stay
// between the barriers and cp.async waits that make the stage valid.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
  }
}

// c += a·b for one m16n8k16 fragment triple, fp32 accumulators. sm_80+ has the k16 shape for fp16
// and bf16; sm_75 only fp16 m16n8k8, so there it is two k8 products: registers a0, a1 with b0 hold
// k 0..7, a2, a3 with b1 hold k 8..15 (the fragment layouts of the two shapes line up that way).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  if constexpr (std::is_same<T, __half>::value) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
                   "{%0, %1, %2, %3};\n"
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                   : "r"(a[2 * h]), "r"(a[2 * h + 1]), "r"(b[h]));
    }
  } else {
    __trap();  // bf16 needs sm_80: never launched below it
  }
#endif
}

// Two adjacent 16-bit or fp32 elements as one aligned load or store.
template <typename T>
struct PairOf;
template <>
struct PairOf<float> {
  using type = float2;
};
template <>
struct PairOf<__half> {
  using type = __half2;
};
template <>
struct PairOf<__nv_bfloat16> {
  using type = __nv_bfloat162;
};
template <typename T>
__device__ __forceinline__ float2 load_pair(const T* p) {
  const typename PairOf<T>::type v = *reinterpret_cast<const typename PairOf<T>::type*>(p);
  return {to_float(v.x), to_float(v.y)};
}
template <typename T>
__device__ __forceinline__ void store_pair(T* p, T v0, T v1) {
  typename PairOf<T>::type v;
  v.x = v0;
  v.y = v1;
  *reinterpret_cast<typename PairOf<T>::type*>(p) = v;
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
