// The host API of the CUDA kernels: plain parameter structs and launch functions that take raw
// device pointers and an explicit stream. No torch and no pybind11 here; bindings.cpp is the only
// file that talks to Python, and it allocates nothing (the caller passes every buffer).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace muon_kernels {

// Element types, numbered as the Python side numbers them (cuda_backend.DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Which tensor-core code path runs: kSm80 uses cp.async multi-stage pipelines and bf16 mma
// (sm_80+); kSm75 uses plain loads with register-staged double buffering and fp16 mma only
// (Turing, or any newer GPU when MUON_KERNELS_CUDA_PATH=sm75 forces it for testing).
enum class CodePath : int { kSm75 = 75, kSm80 = 80 };

// Every Newton–Schulz work buffer is padded to a multiple of kPad rows and columns and the padding
// holds zeros, so the GEMM main loops need no bounds checks (zeros add nothing to X·Xᵀ, A·A or
// B·X). kPad is a multiple of every tile edge in tiles.cuh.
constexpr int kPad = 128;
// Normalization reads its input in tiles of this many rows × columns, one scaled partial sum per tile.
constexpr int kNormTileRows = 64;
constexpr int kNormTileCols = 256;

inline int64_t padded(int64_t size) { return (size + kPad - 1) / kPad * kPad; }
inline int64_t norm_tiles(int64_t rows, int64_t cols) {
  return ((rows + kNormTileRows - 1) / kNormTileRows) * ((cols + kNormTileCols - 1) / kNormTileCols);
}

// out = cast(in / max(norm_scale·‖in‖_F + norm_offset, floor)) per matrix. `in` is any strided
// (batch, rows, cols) view; `out` is contiguous (batch, out_rows, out_cols) with out_rows >= rows,
// out_cols >= cols, zeros written outside the input. A NaN norm stays NaN.
struct NormalizeParams {
  const void* in = nullptr;
  DType in_dtype = DType::kFloat32;
  int64_t in_stride_batch = 0, in_stride_row = 0, in_stride_col = 0;
  int64_t rows = 0, cols = 0;
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
  int64_t out_rows = 0, out_cols = 0;
  float* partial = nullptr;  // (batch, 2, norm_tiles(rows, cols)) fp32 scratch: tile scales, scaled sums
  float* denom = nullptr;    // (batch, 2) fp32 scratch: 1/S and the divisor in units of S per matrix
  int64_t batch = 0;
  float norm_scale = 1.f, norm_offset = 0.f, floor = 0.f;
};

// c = alpha·p·pᵀ + beta·d for a (batch, m, k) stack p; c and d are (batch, m, m), d optional and
// symmetric. Only upper-triangle tiles are computed, each stored twice (mirrored), so c is exactly
// symmetric. m and k are multiples of kPad; all three share one dtype.
struct SymmetricMatmulParams {
  const void* p = nullptr;
  const void* d = nullptr;
  void* c = nullptr;
  DType dtype = DType::kFloat32;
  int64_t batch = 0, m = 0, k = 0;
  float alpha = 1.f, beta = 0.f;
};

// out = a·x + b·x for b (batch, m, m) and x (batch, m, n), m and n multiples of kPad. out is a
// contiguous (batch, out_rows, out_cols) tensor (the padded size, or the unpadded result) of
// out_dtype; only its in-bounds elements are written.
struct NsUpdateParams {
  const void* b = nullptr;
  const void* x = nullptr;
  void* out = nullptr;
  DType dtype = DType::kFloat32;
  DType out_dtype = DType::kFloat32;
  int64_t batch = 0, m = 0, n = 0;
  int64_t out_rows = 0, out_cols = 0;
  float a = 0.f;
};

// The whole recurrence: normalize `in` into x (padded, work dtype), then per (a, b, c) step
// A = x·xᵀ, B = b·A + c·A·A, x' = a·x + B·x; the last step (or normalization, for zero steps)
// writes the unpadded (batch, rows, cols) result into `out`.
struct NewtonSchulzParams {
  NormalizeParams normalize;            // in, strides, rows, cols, partial, denom, batch, norm_*
  void* x = nullptr;                    // (batch, padded(rows), padded(cols)) work dtype
  void* y = nullptr;                    // same shape: the other half of the ping-pong
  void* a = nullptr;                    // (batch, padded(rows), padded(rows)) work dtype
  void* b = nullptr;                    // same shape as a
  DType work_dtype = DType::kFloat32;   // fp16 on the sm75 path for bf16 iterations
  void* out = nullptr;                  // (batch, rows, cols) out_dtype
  DType out_dtype = DType::kFloat32;
  std::vector<float> coefficients;      // 3 per step: a, b, c
};

void normalize(const NormalizeParams& params, cudaStream_t stream);
void symmetric_matmul(const SymmetricMatmulParams& params, CodePath path, cudaStream_t stream);
void ns_update(const NsUpdateParams& params, CodePath path, cudaStream_t stream);
void newton_schulz(const NewtonSchulzParams& params, CodePath path, cudaStream_t stream);

// Multi-tensor elementwise kernels (apex's pattern): the tensors' addresses travel inside the
// kernel arguments, so a launch needs no device-side table and a CUDA graph can capture it.
struct TensorList {
  std::vector<uintptr_t> grads;       // momentum: gradients; update: unused
  std::vector<uintptr_t> tensors;     // momentum: buffers; update: parameters
  std::vector<int64_t> numels;
  std::vector<int64_t> stack_offsets; // element offset of each tensor's first matrix in the stack
  std::vector<int64_t> rows, cols;    // the (batch, rows, cols) matrix view of each tensor
  std::vector<uint8_t> transposed;    // 1: the stack holds each matrix transposed
};

// M = μM + (1-μ)G (ema) or μM + G; U = Nesterov(G, M) or M, written into the stack (stack dtype
// = buffer dtype, which is the gradients' or float32). momenta: fp32 device array, (μ, 1 - μ) per tensor.
void fused_momentum(const TensorList& list, DType grad_dtype, DType buf_dtype, const float* momenta,
                    void* stack, bool ema, bool nesterov, cudaStream_t stream);
// W = round(W·decay) + alpha·round(O) per parameter, O read from its slice of the stack; cautious:
// the decay only where W·O >= 0 (cautious weight decay).
void fused_apply_update(const TensorList& list, DType param_dtype, const float* alphas, const float* decays,
                        const void* stack, DType stack_dtype, bool cautious, cudaStream_t stream);

}  // namespace muon_kernels
