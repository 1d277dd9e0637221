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
// A split symmetric product keeps one fp32 kSplitTileEdge² tile per (matrix, output tile, slice):
// the tensor-core and FMA GEMMs' block edge.
constexpr int kSplitTileEdge = 128;
constexpr int kSplitTile = kSplitTileEdge * kSplitTileEdge;
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
// splits > 1 (products with too few tiles to fill the GPU): each tile's K extent is cut into that
// many slices (fewer if a slice would be empty), each slice's fp32 product written to
// split_partial; the slice that arrives last at its tile's counter (split_counters) sums them in
// slice order (fixed: repeats give the same bits) and applies the epilogue, in the same launch.
// split_partial holds split_partial_elements(batch, m, splits) floats; split_counters holds
// batch · symmetric_tiles(m) int32 zeros, which every launch leaves at zero (so one array serves the
// launches of one stream; launches that may run at once need arrays of their own).
struct SymmetricMatmulParams {
  const void* p = nullptr;
  const void* d = nullptr;
  void* c = nullptr;
  DType dtype = DType::kFloat32;
  int64_t batch = 0, m = 0, k = 0;
  float alpha = 1.f, beta = 0.f;
  int64_t splits = 1;
  float* split_partial = nullptr;
  int32_t* split_counters = nullptr;
};

// Output tiles of a symmetric product (the upper triangle of 128×128 tiles, per matrix).
int64_t symmetric_tiles(int64_t m);
// fp32 elements of the split workspace of a (batch, m, m) symmetric product cut into `splits` slices.
int64_t split_partial_elements(int64_t batch, int64_t m, int64_t splits);

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
  int64_t gram_splits = 1;              // K slices of x·xᵀ (k = padded cols) and of A·A (k = padded
  int64_t square_splits = 1;            // rows); see SymmetricMatmulParams
  float* split_partial = nullptr;       // room for the larger of the two splits' workspaces
  int32_t* split_counters = nullptr;    // batch · symmetric_tiles(padded(rows)) int32 zeros, left at zero
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
  std::vector<uint8_t> neuron_cols;   // update with a variant: 1 where the neurons are the view's columns
  std::vector<int64_t> row_strides;   // elements between rows in memory: cols, or a wider matrix's for a
                                      // split piece that is a column block; empty: all contiguous
  // low-precision momentum (muon_kernels/momentum_precision.py): int8 block scales (fp32, one per 256
  // values), int64 step counters and 31-bit seeds for stochastic rounding; empty when unused.
  std::vector<uintptr_t> scales, steps;
  std::vector<uint32_t> seeds;
};

// How fused_momentum stores the momentum: int8 (+ scales; the stack then has the gradients' dtype)
// or bf16, rounded to nearest or stochastically.
struct LowPrecisionMomentum {
  bool int8 = false;
  bool stochastic = false;
};

// Post-orthogonalization variants (muon_kernels/variants.py), applied by fused_apply_update: O is
// multiplied by gains[k] (matrix k of the stack) and, for NorMuon, by row_scale[k·nmax + neuron];
// the hyperball then multiplies W by shrink[k]. Null pointers switch each part off.
struct VariantFactors {
  const float* row_scale = nullptr;
  const float* gains = nullptr;
  const float* shrink = nullptr;
  int64_t nmax = 0;
};

// The statistics pass of the variants: per output neuron i of matrix k, q_i = Σ_j O_ij² and, with
// the hyperball, Σ_j W_ij·O_ij and Σ_j W_ij²; NorMuon's v_i ← lerp(v_i, q_i / inputs, weight) in
// place and s_i = 1 / (√v_i + eps) into row_scale; per (matrix, block of kVariantNeurons neurons)
// the partial sums (Σq, Σs²q, Σs·(W·O), ΣW²). The table (device, kVariantTableColumns int64 per
// matrix) holds: parameter address of the matrix, its v address (0 without NorMuon), rows, cols,
// transposed (in the stack), neurons on the view's columns, and the parameter's row stride (its
// cols, or a wider matrix's for a column slice).
constexpr int kVariantNeurons = 8;
constexpr int kVariantTableColumns = 7;
struct VariantStatisticsParams {
  const void* ortho = nullptr;  // (matrices, m, n) stack
  DType ortho_dtype = DType::kBFloat16;
  DType param_dtype = DType::kFloat32;
  const int64_t* table = nullptr;
  int64_t matrices = 0, m = 0, n = 0;
  float* row_scale = nullptr;  // (matrices, n) fp32; NorMuon only
  float* partials = nullptr;   // (matrices, ceil(n / kVariantNeurons), 4) fp32
  float weight = 0.f;          // 1 - β2
  float eps = 0.f;
  bool normuon = false, hyperball = false;
};
void variant_statistics(const VariantStatisticsParams& params, cudaStream_t stream);

// M = μM + (1-μ)G (ema) or μM + G; U = Nesterov(G, M) or M, written into the stack (stack dtype
// = buffer dtype, which is the gradients' or float32). momenta: fp32 device array, (μ, 1 - μ) per tensor.
void fused_momentum(const TensorList& list, DType grad_dtype, DType buf_dtype, const float* momenta,
                    void* stack, bool ema, bool nesterov, cudaStream_t stream);
// The same with a low-precision momentum: M in fp32 from the stored M and G at its own precision,
// stored back as int8 + block scales or stochastically rounded bf16 (buf_dtype is then ignored).
void low_precision_momentum(const TensorList& list, DType grad_dtype, const float* momenta, void* stack,
                            bool ema, bool nesterov, LowPrecisionMomentum low, cudaStream_t stream);
// W = round(W·decay) + alpha·round(O) per parameter, O read from its slice of the stack; cautious:
// the decay only where W·O >= 0 (cautious weight decay).
// variant: see VariantFactors (all null: the plain update).
void fused_apply_update(const TensorList& list, DType param_dtype, const float* alphas, const float* decays,
                        const void* stack, DType stack_dtype, bool cautious, const VariantFactors& variant,
                        cudaStream_t stream);

}  // namespace muon_kernels
