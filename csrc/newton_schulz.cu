// Batched Newton–Schulz: normalization (three deterministic passes), the symmetric X·Xᵀ and
// b·A + c·A·A kernel (upper-triangle tiles, mirrored store), the a·X + B·X kernel, and the host
// driver that runs the recurrence with launches only (no allocation, no synchronization).
#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "common.cuh"
#include "gemm.cuh"

namespace muon_kernels {
namespace {

constexpr int kNormThreads = 256;

struct Add {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Deterministic block reduction of non-negative values (a fixed shuffle tree, then the warps'
// results in order), returned to every thread. Safe to call repeatedly in one kernel.
template <typename Op>
__device__ float block_reduce(float v, Op op) {
  __shared__ float warp_values[32];
  __shared__ float result;
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_values[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_values[lane] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (lane == 0) result = v;
  }
  __syncthreads();
  const float out = result;
  __syncthreads();  // the next call may overwrite warp_values and result
  return out;
}

// The biased exponent of x >= 0, clamped to [1, 253] so that 2^e and 2^-e are both normal floats.
__device__ __forceinline__ int exponent_field(float x) { return min(max((__float_as_int(x) >> 23) & 0xFF, 1), 253); }
// 2^(field - 127), exactly.
__device__ __forceinline__ float power_of_two(int field) { return __int_as_float(field << 23); }

// Pass 1: per input tile, a power of two s near its largest |x| and Σ(x/s)² (BLAS nrm2's scaled
// sum of squares: nothing overflows at |x| up to fp32's max or underflows down to 1e-38).
// partial is (batch, 2, tiles): the scales, then the scaled sums.
template <typename Tin>
__global__ void __launch_bounds__(kNormThreads) sum_squares_kernel(NormalizeParams p, int64_t batch_offset) {
  const int64_t batch = batch_offset + blockIdx.y;
  const int64_t tiles_c = (p.cols + kNormTileCols - 1) / kNormTileCols;
  const int64_t r0 = (blockIdx.x / tiles_c) * kNormTileRows, c0 = (blockIdx.x % tiles_c) * kNormTileCols;
  const Tin* in = static_cast<const Tin*>(p.in) + batch * p.in_stride_batch;
  float amax = 0.f;
  for (int e = threadIdx.x; e < kNormTileRows * kNormTileCols; e += kNormThreads) {
    const int64_t r = r0 + e / kNormTileCols, c = c0 + e % kNormTileCols;
    if (r < p.rows && c < p.cols) amax = fmaxf(amax, fabsf(to_float(in[r * p.in_stride_row + c * p.in_stride_col])));
  }
  const int field = exponent_field(block_reduce(amax, Max()));
  const float inv = power_of_two(254 - field);  // exact scaling
  float s = 0.f;
  for (int e = threadIdx.x; e < kNormTileRows * kNormTileCols; e += kNormThreads) {
    const int64_t r = r0 + e / kNormTileCols, c = c0 + e % kNormTileCols;
    if (r < p.rows && c < p.cols) {
      const float v = to_float(in[r * p.in_stride_row + c * p.in_stride_col]) * inv;
      s = fmaf(v, v, s);
    }
  }
  s = block_reduce(s, Add());
  if (threadIdx.x == 0) {
    float* partial = p.partial + batch * 2 * gridDim.x;
    partial[blockIdx.x] = power_of_two(field);
    partial[gridDim.x + blockIdx.x] = s;
  }
}

// Pass 2: per matrix, from its partials in a fixed order: the tiles' sums rescaled to the largest
// tile scale S (powers of two: exact), and the divisor in units of S, so it never overflows.
// denom is (batch, 2): 1/S, then the scaled divisor.
__global__ void __launch_bounds__(kNormThreads) norm_divisor_kernel(NormalizeParams p, int64_t tiles,
                                                                     int64_t batch_offset) {
  const int64_t batch = batch_offset + blockIdx.x;
  const float* scales = p.partial + batch * 2 * tiles;
  const float* sums = scales + tiles;
  float top = 0.f;
  for (int64_t t = threadIdx.x; t < tiles; t += kNormThreads) top = fmaxf(top, scales[t]);
  const float inv = power_of_two(254 - exponent_field(block_reduce(top, Max())));
  float s = 0.f;
  for (int64_t t = threadIdx.x; t < tiles; t += kNormThreads) {
    const float ratio = scales[t] * inv;
    s = fmaf(sums[t], ratio * ratio, s);
  }
  s = block_reduce(s, Add());
  if (threadIdx.x == 0) {
    // Round-to-nearest sqrt, whatever the compiler flags (torch's sqrt is IEEE).
    const float d = fmaf(__fsqrt_rn(s), p.norm_scale, p.norm_offset * inv);
    const float floor = p.floor * inv;
    p.denom[2 * batch] = inv;
    p.denom[2 * batch + 1] = d < floor ? floor : d;  // a NaN norm fails the comparison and stays NaN
  }
}

// Pass 3: scale and cast into the (padded) output; zeros outside the input.
template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kNormThreads) scale_cast_kernel(NormalizeParams p, int64_t batch_offset) {
  const int64_t batch = batch_offset + blockIdx.y;
  const int64_t tiles_c = (p.out_cols + kNormTileCols - 1) / kNormTileCols;
  const int64_t r0 = (blockIdx.x / tiles_c) * kNormTileRows, c0 = (blockIdx.x % tiles_c) * kNormTileCols;
  const Tin* in = static_cast<const Tin*>(p.in) + batch * p.in_stride_batch;
  Tout* out = static_cast<Tout*>(p.out) + batch * p.out_rows * p.out_cols;
  const float inv = p.denom[2 * batch], denom = p.denom[2 * batch + 1];
  for (int e = threadIdx.x; e < kNormTileRows * kNormTileCols; e += kNormThreads) {
    const int64_t r = r0 + e / kNormTileCols, c = c0 + e % kNormTileCols;
    if (r < p.out_rows && c < p.out_cols) {
      const float v =
          r < p.rows && c < p.cols ? __fdiv_rn(to_float(in[r * p.in_stride_row + c * p.in_stride_col]) * inv, denom) : 0.f;
      out[r * p.out_cols + c] = from_float<Tout>(v);
    }
  }
}

// c[i][j] = c[j][i] = alpha·acc + beta·d[i][j] for i <= j (elements below the diagonal of a
// diagonal tile are the mirror of ones above it, so they are skipped). Called for columns j and
// j + 1 (j even, m even: pairs are aligned).
template <typename T>
struct SymmetricEpilogue {
  T* c;
  const T* d;
  int64_t m;
  float alpha, beta;
  __device__ void operator()(int64_t batch, int64_t i, int64_t j, float acc0, float acc1) const {
    if (i > j + 1) return;
    const int64_t base = batch * m * m;
    float v0 = alpha * acc0, v1 = alpha * acc1;
    if (d != nullptr) {
      const float2 dv = load_pair(d + base + i * m + j);
      v0 = fmaf(beta, dv.x, v0);
      v1 = fmaf(beta, dv.y, v1);
    }
    const T o0 = from_float<T>(v0), o1 = from_float<T>(v1);
    if (i <= j) {
      store_pair(c + base + i * m + j, o0, o1);
    } else {
      c[base + i * m + j + 1] = o1;  // i = j + 1: only (i, j + 1) is on or above the diagonal
    }
    // The mirror, column-wise: the 8 lanes of a row group write 8 consecutive elements of a row.
    if (i < j) c[base + j * m + i] = o0;
    if (i < j + 1) c[base + (j + 1) * m + i] = o1;
  }
};

// out[i][j] = acc + a·x[i][j], in bounds of out only; columns j and j + 1 (j even, n even).
template <typename T, typename OutT>
struct UpdateEpilogue {
  const T* x;
  OutT* out;
  int64_t m, n, out_rows, out_cols;
  float a;
  __device__ void operator()(int64_t batch, int64_t i, int64_t j, float acc0, float acc1) const {
    if (i >= out_rows || j >= out_cols) return;
    const float2 xv = load_pair(x + batch * m * n + i * n + j);
    const OutT o0 = from_float<OutT>(fmaf(a, xv.x, acc0)), o1 = from_float<OutT>(fmaf(a, xv.y, acc1));
    OutT* o = out + batch * out_rows * out_cols + i * out_cols + j;
    // The unpadded result may have an odd width (and any 2-byte aligned base): pairs where aligned.
    if (j + 1 < out_cols && reinterpret_cast<uintptr_t>(o) % sizeof(typename PairOf<OutT>::type) == 0) {
      store_pair(o, o0, o1);
    } else {
      o[0] = o0;
      if (j + 1 < out_cols) o[1] = o1;
    }
  }
};

// The fp32 product of one K slice of one tile, into its own 128×128 slot of the split workspace
// (i, j are tile-local: the split kernel runs the GEMM with row0 = col0 = 0).
struct PartialEpilogue {
  float* tile;
  __device__ void operator()(int64_t, int64_t i, int64_t j, float acc0, float acc1) const {
    *reinterpret_cast<float2*>(tile + i * kSplitTileEdge + j) = make_float2(acc0, acc1);
  }
};

// Block t of a triangular grid → tile (ti, tj), ti <= tj, column by column: tj = ⌊(√(8t+1)-1)/2⌋.
__device__ __forceinline__ void triangular_tile(int64_t t, int64_t& ti, int64_t& tj) {
  int64_t j = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (j * (j + 1) / 2 > t) --j;
  while ((j + 1) * (j + 2) / 2 <= t) ++j;
  tj = j;
  ti = t - j * (j + 1) / 2;
}

// A split product's fixup, in the block of each slice once its partial is stored (CUTLASS's
// semaphore pattern, as the Triton split kernel): the slice counts itself in at its tile's
// counter, and the one that arrives last sums the tile's partials in slice order — fixed, whoever
// arrives last, so repeats give the same bits; floats are never atomic — applies the unsplit
// kernel's epilogue and resets the counter to zero for the next launch on the stream.
// Not inlined, with plain arguments, and the tile's indices recomputed from the block's: inlined,
// the values it needs were carried through the main loop, which spilled in the kernels at their
// register caps (fp32 at 128 on sm_90, the sm75 path at 255 on sm_75); a struct reference
// would have copied the params to the stack.
template <typename T>
__device__ __noinline__ void fixup_split_tile(float* split_partial, int32_t* split_counters, T* c, const T* d,
                                              int64_t m, float alpha, float beta, int64_t splits,
                                              int64_t batch_offset) {
  const int64_t batch = batch_offset + blockIdx.y, tile = blockIdx.x / splits, tiles = gridDim.x / splits;
  __threadfence();  // this thread's partial stores are visible device-wide before the count below
  __syncthreads();
  int arrived_last = 0;
  if (threadIdx.x == 0) {
    int32_t* counter = split_counters + batch * tiles + tile;
    arrived_last = atomicAdd(counter, 1) == splits - 1;
    if (arrived_last) {
      *counter = 0;  // every slice has counted in
      __threadfence();  // the other slices' partials are read after their counts were seen
    }
  }
  // A barrier that also broadcasts thread 0's answer: no __shared__ flag, because any static
  // shared memory would push the sm80 path's 48 KB of dynamic shared memory over the limit that
  // needs no opt-in, and cost the sm75 path its second block per SM on Turing (64 KB per SM).
  if (!__syncthreads_or(arrived_last)) return;
  int64_t ti, tj;
  triangular_tile(tile, ti, tj);
  const float* slices = split_partial + (batch * tiles + tile) * splits * kSplitTile;
  const SymmetricEpilogue<T> epilogue{c, d, m, alpha, beta};
  for (int e = 2 * threadIdx.x; e < kSplitTile; e += 2 * blockDim.x) {
    // .cg: from L2, where the other blocks' stores are, never from a stale L1 line.
    float2 sum = __ldcg(reinterpret_cast<const float2*>(slices + e));
    for (int64_t s = 1; s < splits; ++s) {
      const float2 v = __ldcg(reinterpret_cast<const float2*>(slices + s * kSplitTile + e));
      sum.x += v.x;
      sum.y += v.y;
    }
    epilogue(batch, ti * kSplitTileEdge + e / kSplitTileEdge, tj * kSplitTileEdge + e % kSplitTileEdge, sum.x, sum.y);
  }
}

// One block per upper-triangle tile (per K slice of it when split): blockIdx.x = tile · splits + slice.
template <typename T, CodePath PATH>
__global__ void __launch_bounds__(GemmFor<T, PATH, true>::type::kThreads, GemmFor<T, PATH, true>::type::kMinBlocksPerSM)
    symmetric_matmul_kernel(SymmetricMatmulParams p, int64_t batch_offset) {
  if constexpr (arch_supports<T, PATH>()) {
    using Gemm = typename GemmFor<T, PATH, true>::type;
    extern __shared__ __align__(128) unsigned char smem[];
    const int64_t tile = blockIdx.x / p.splits, slice = blockIdx.x % p.splits;
    int64_t ti, tj;
    triangular_tile(tile, ti, tj);
    const int64_t batch = batch_offset + blockIdx.y;
    const T* P = static_cast<const T*>(p.p) + batch * p.m * p.k;
    const T* rows_i = P + ti * Gemm::BM * p.k;
    const T* rows_j = P + tj * Gemm::BN * p.k;
    if (p.splits == 1) {
      const SymmetricEpilogue<T> epilogue{static_cast<T*>(p.c), static_cast<const T*>(p.d), p.m, p.alpha, p.beta};
      Gemm::run(rows_i, p.k, rows_j, p.k, p.k, smem, batch, ti * Gemm::BM, tj * Gemm::BN, epilogue);
    } else {
      // The host passed tile::effective_splits: every slice is non-empty.
      const int64_t per_slice = tile::slice_tiles(p.k / Gemm::BK, p.splits) * Gemm::BK;
      const int64_t k0 = slice * per_slice, extent = min(per_slice, p.k - k0);
      const int64_t tiles = gridDim.x / p.splits;
      const PartialEpilogue epilogue{p.split_partial + ((batch * tiles + tile) * p.splits + slice) * kSplitTile};
      Gemm::run(rows_i + k0, p.k, rows_j + k0, p.k, extent, smem, batch, 0, 0, epilogue);
      fixup_split_tile<T>(p.split_partial, p.split_counters, static_cast<T*>(p.c), static_cast<const T*>(p.d), p.m,
                          p.alpha, p.beta, p.splits, batch_offset);
    }
  } else {
    __trap();
  }
}

template <typename T, typename OutT, CodePath PATH>
__global__ void __launch_bounds__(GemmFor<T, PATH, false>::type::kThreads,
                                  GemmFor<T, PATH, false>::type::kMinBlocksPerSM)
    ns_update_kernel(NsUpdateParams p, int64_t batch_offset) {
  if constexpr (arch_supports<T, PATH>()) {
    using Gemm = typename GemmFor<T, PATH, false>::type;
    extern __shared__ __align__(128) unsigned char smem[];
    // Consecutive blocks walk along a row panel of B, which stays in L2 while X streams by.
    const int64_t tiles_n = p.n / Gemm::BN;
    const int64_t pm = blockIdx.x / tiles_n, pn = blockIdx.x % tiles_n;
    const int64_t batch = batch_offset + blockIdx.y;
    const T* B = static_cast<const T*>(p.b) + batch * p.m * p.m;
    const T* X = static_cast<const T*>(p.x);
    const UpdateEpilogue<T, OutT> epilogue{X, static_cast<OutT*>(p.out), p.m, p.n, p.out_rows, p.out_cols, p.a};
    Gemm::run(B + pm * Gemm::BM * p.m, p.m, X + batch * p.m * p.n + pn * Gemm::BN, p.n, p.m, smem, batch,
              pm * Gemm::BM, pn * Gemm::BN, epilogue);
  } else {
    __trap();
  }
}

// ---- host side ---------------------------------------------------------------------------------

const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "float32" : d == DType::kFloat16 ? "float16" : "bfloat16";
}

// An iteration writes its own dtype, or bf16 from fp16 (the sm75 path's last step of a bf16 run).
bool update_writes(DType in, DType out) { return out == in || (in == DType::kFloat16 && out == DType::kBFloat16); }

void require_buffer(const void* ptr, const char* what, const char* name) {
  require(ptr != nullptr, std::string(what) + ": " + name + " is a null pointer");
  require(reinterpret_cast<uintptr_t>(ptr) % 16 == 0,
          std::string(what) + ": " + name + " must be 16-byte aligned (a fresh torch allocation is)");
}

void require_splits(int64_t splits, const float* split_partial, const int32_t* split_counters, const char* what) {
  require(splits >= 1, std::string(what) + ": splits must be >= 1, got " + std::to_string(splits));
  require(splits == 1 || (split_partial != nullptr && reinterpret_cast<uintptr_t>(split_partial) % 16 == 0),
          std::string(what) + ": a split product (splits > 1) needs split_partial, a 16-byte aligned fp32 buffer of "
                              "split_partial_elements(batch, m, splits) elements");
  require(splits == 1 || (split_counters != nullptr && reinterpret_cast<uintptr_t>(split_counters) % 4 == 0),
          std::string(what) + ": a split product (splits > 1) needs split_counters, batch · symmetric_tiles(m) int32 "
                              "zeros (each launch leaves them at zero)");
}

void require_padded(int64_t size, const char* what, const char* name) {
  require(size > 0 && size % kPad == 0, std::string(what) + ": " + name + " = " + std::to_string(size) +
                                            " must be a positive multiple of " + std::to_string(kPad) +
                                            " (pad the buffer; the padding must hold zeros)");
}

// The sm80 path needs sm_80; bf16 operands need the sm80 path.
void require_path(CodePath path, DType dtype, const char* what) {
  const int code = static_cast<int>(path);
  require(path == CodePath::kSm75 || path == CodePath::kSm80,
          std::string(what) + ": unknown code path " + std::to_string(code) + " (75 or 80)");
  require(!(dtype == DType::kBFloat16 && path == CodePath::kSm75),
          std::string(what) + ": bfloat16 operands need the sm80 path; the sm75 path iterates in float16");
  if (path == CodePath::kSm80) {
    int device = 0, major = 0;
    if (cudaGetDevice(&device) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess) {
      require(major >= 8, std::string(what) + ": the sm80 path (cp.async, bf16 mma) needs compute capability 8.0+, "
                                              "this device is " + std::to_string(major) + ".x: use the sm75 path");
    }
  }
}

// Opting a kernel into more than 48 KB of dynamic shared memory is a per-(function, device)
// attribute: set it once for each, not before every launch.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, int bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) check_launch(what);
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key)) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess) check_launch(what);
  done.insert(key);
}

// Launches kernel over grid.x blocks per matrix, the batch split into grid.y-sized pieces.
template <typename Kernel, typename Params>
void launch_batched(Kernel kernel, int64_t grid_x, int threads, int smem, int64_t batch, const Params& params,
                    cudaStream_t stream, const char* what) {
  require(grid_x <= kMaxGridX, std::string(what) + ": " + std::to_string(grid_x) + " blocks per matrix exceed the grid's x limit");
  for (int64_t offset = 0; offset < batch; offset += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(std::min(kMaxGridY, batch - offset)));
    kernel<<<grid, threads, smem, stream>>>(params, offset);
  }
  check_launch(what);
}

template <typename T, CodePath PATH>
void launch_symmetric_matmul(const SymmetricMatmulParams& params, cudaStream_t stream) {
  using Gemm = typename GemmFor<T, PATH, true>::type;
  static_assert(Gemm::BM == kSplitTileEdge && Gemm::BN == kSplitTileEdge, "split workspace slots are one tile each");
  SymmetricMatmulParams p = params;
  p.splits = tile::effective_splits(p.k / Gemm::BK, p.splits);
  const int64_t tiles = symmetric_tiles(p.m);
  auto kernel = symmetric_matmul_kernel<T, PATH>;
  allow_shared_memory(kernel, Gemm::kSmemBytes, "symmetric_matmul");
  launch_batched(kernel, tiles * p.splits, Gemm::kThreads, Gemm::kSmemBytes, p.batch, p, stream, "symmetric_matmul");
}

template <typename T, typename OutT, CodePath PATH>
void launch_ns_update(const NsUpdateParams& p, cudaStream_t stream) {
  using Gemm = typename GemmFor<T, PATH, false>::type;
  auto kernel = ns_update_kernel<T, OutT, PATH>;
  allow_shared_memory(kernel, Gemm::kSmemBytes, "ns_update");
  launch_batched(kernel, (p.m / Gemm::BM) * (p.n / Gemm::BN), Gemm::kThreads, Gemm::kSmemBytes, p.batch, p, stream,
                 "ns_update");
}

template <typename Tin, typename Tout>
void launch_normalize(const NormalizeParams& p, cudaStream_t stream) {
  const int64_t tiles = norm_tiles(p.rows, p.cols);
  launch_batched(sum_squares_kernel<Tin>, tiles, kNormThreads, 0, p.batch, p, stream, "normalize");
  for (int64_t offset = 0; offset < p.batch; offset += kMaxGridY) {
    const unsigned blocks = static_cast<unsigned>(std::min(kMaxGridY, p.batch - offset));
    norm_divisor_kernel<<<blocks, kNormThreads, 0, stream>>>(p, tiles, offset);
  }
  check_launch("normalize");
  launch_batched(scale_cast_kernel<Tin, Tout>, norm_tiles(p.out_rows, p.out_cols), kNormThreads, 0, p.batch, p,
                 stream, "normalize");
}

// The launches behind symmetric_matmul and ns_update, for arguments already validated.
void run_symmetric_matmul(const SymmetricMatmulParams& p, CodePath path, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return launch_symmetric_matmul<float, CodePath::kSm75>(p, stream);
    case DType::kFloat16:
      return path == CodePath::kSm80 ? launch_symmetric_matmul<__half, CodePath::kSm80>(p, stream)
                                     : launch_symmetric_matmul<__half, CodePath::kSm75>(p, stream);
    case DType::kBFloat16: return launch_symmetric_matmul<__nv_bfloat16, CodePath::kSm80>(p, stream);
  }
}

void run_ns_update(const NsUpdateParams& p, CodePath path, cudaStream_t stream) {
  const bool sm80 = path == CodePath::kSm80;
  switch (p.dtype) {
    case DType::kFloat32: return launch_ns_update<float, float, CodePath::kSm75>(p, stream);
    case DType::kFloat16:
      if (p.out_dtype == DType::kBFloat16) {
        return sm80 ? launch_ns_update<__half, __nv_bfloat16, CodePath::kSm80>(p, stream)
                    : launch_ns_update<__half, __nv_bfloat16, CodePath::kSm75>(p, stream);
      }
      return sm80 ? launch_ns_update<__half, __half, CodePath::kSm80>(p, stream)
                  : launch_ns_update<__half, __half, CodePath::kSm75>(p, stream);
    case DType::kBFloat16: return launch_ns_update<__nv_bfloat16, __nv_bfloat16, CodePath::kSm80>(p, stream);
  }
}

}  // namespace

void normalize(const NormalizeParams& p, cudaStream_t stream) {
  require_dtype(p.in_dtype, "normalize");
  require_dtype(p.out_dtype, "normalize");
  require(p.in != nullptr && p.out != nullptr && p.partial != nullptr && p.denom != nullptr,
          "normalize: in, out, partial and denom must be device pointers, got a null pointer");
  require(p.batch > 0 && p.rows > 0 && p.cols > 0, "normalize: batch, rows and cols must be positive");
  require(p.out_rows >= p.rows && p.out_cols >= p.cols,
          "normalize: the output (" + std::to_string(p.out_rows) + "×" + std::to_string(p.out_cols) +
              ") must cover the input (" + std::to_string(p.rows) + "×" + std::to_string(p.cols) + ")");
  dispatch_dtype(p.in_dtype, "normalize", [&](auto in) {
    dispatch_dtype(p.out_dtype, "normalize", [&](auto out) {
      launch_normalize<decltype(in), decltype(out)>(p, stream);
    });
  });
}

int64_t symmetric_tiles(int64_t m) {
  const int64_t t = m / kSplitTileEdge;
  return t * (t + 1) / 2;
}

int64_t split_partial_elements(int64_t batch, int64_t m, int64_t splits) {
  require(batch >= 0 && m >= 0 && splits >= 1, "split_partial_elements: batch and m must be >= 0, splits >= 1");
  return splits == 1 ? 0 : batch * symmetric_tiles(padded(m)) * splits * kSplitTile;
}

void symmetric_matmul(const SymmetricMatmulParams& p, CodePath path, cudaStream_t stream) {
  const char* what = "symmetric_matmul";
  require_splits(p.splits, p.split_partial, p.split_counters, what);
  require_dtype(p.dtype, what);
  require_buffer(p.p, what, "p");
  require_buffer(p.c, what, "c");
  require(p.d == nullptr || reinterpret_cast<uintptr_t>(p.d) % 16 == 0, "symmetric_matmul: d must be 16-byte aligned");
  require(p.d != p.c || p.d == nullptr, "symmetric_matmul: c must not alias d (write into another buffer)");
  require(p.batch > 0, "symmetric_matmul: batch must be positive");
  require_padded(p.m, what, "m");
  require_padded(p.k, what, "k");
  require_path(path, p.dtype, what);
  run_symmetric_matmul(p, path, stream);
}

void ns_update(const NsUpdateParams& p, CodePath path, cudaStream_t stream) {
  const char* what = "ns_update";
  require_dtype(p.dtype, what);
  require_dtype(p.out_dtype, what);
  require_buffer(p.b, what, "b");
  require_buffer(p.x, what, "x");
  require(p.out != nullptr, "ns_update: out is a null pointer");
  require(p.out != p.x, "ns_update: out must not alias x (other blocks still read it)");
  require(p.batch > 0, "ns_update: batch must be positive");
  require_padded(p.m, what, "m");
  require_padded(p.n, what, "n");
  require(p.out_rows > 0 && p.out_rows <= p.m && p.out_cols > 0 && p.out_cols <= p.n,
          "ns_update: out_rows × out_cols must lie within m × n");
  require(update_writes(p.dtype, p.out_dtype),
          std::string("ns_update: a ") + dtype_name(p.dtype) + " iteration writes " + dtype_name(p.dtype) +
              " (or bfloat16 from float16 on the sm75 path), not " + dtype_name(p.out_dtype));
  require_path(path, p.dtype, what);
  run_ns_update(p, path, stream);
}

void newton_schulz(const NewtonSchulzParams& p, CodePath path, cudaStream_t stream) {
  require(p.coefficients.size() % 3 == 0,
          "newton_schulz: coefficients must hold 3 numbers (a, b, c) per step, got " +
              std::to_string(p.coefficients.size()));
  const NormalizeParams& in = p.normalize;
  NormalizeParams norm = in;
  const size_t steps = p.coefficients.size() / 3;
  if (steps == 0) {
    norm.out = p.out;
    norm.out_dtype = p.out_dtype;
    norm.out_rows = in.rows;
    norm.out_cols = in.cols;
    return normalize(norm, stream);
  }
  const int64_t m = padded(in.rows), n = padded(in.cols);
  for (auto [ptr, name] : {std::pair<const void*, const char*>{p.x, "x"}, {p.y, "y"}, {p.a, "a"}, {p.b, "b"}}) {
    require_buffer(ptr, "newton_schulz", name);
  }
  require(p.out != nullptr, "newton_schulz: out is a null pointer");
  require(p.x != p.y && p.a != p.b, "newton_schulz: x and y, and a and b, must be distinct buffers");
  require(p.out != p.x && p.out != p.y, "newton_schulz: out must not alias x or y (other blocks still read them)");
  // Everything the launches below need is validated here, once, so a bad call launches nothing
  // and the loop launches without re-checking (m and n are padded by construction).
  require_dtype(p.work_dtype, "newton_schulz");
  require_dtype(p.out_dtype, "newton_schulz");
  require(update_writes(p.work_dtype, p.out_dtype),
          "newton_schulz: out_dtype must equal work_dtype (or be bfloat16 with a float16 work dtype)");
  require_path(path, p.work_dtype, "newton_schulz");
  require(p.gram_splits >= 1 && p.square_splits >= 1, "newton_schulz: gram_splits and square_splits must be >= 1");
  require_splits(std::max(p.gram_splits, p.square_splits), p.split_partial, p.split_counters, "newton_schulz");
  norm.out = p.x;
  norm.out_dtype = p.work_dtype;
  norm.out_rows = m;
  norm.out_cols = n;
  normalize(norm, stream);
  void* x = p.x;
  void* y = p.y;
  for (size_t s = 0; s < steps; ++s) {
    const float a = p.coefficients[3 * s], b = p.coefficients[3 * s + 1], c = p.coefficients[3 * s + 2];
    run_symmetric_matmul(
        {x, nullptr, p.a, p.work_dtype, in.batch, m, n, 1.f, 0.f, p.gram_splits, p.split_partial, p.split_counters},
        path, stream);
    run_symmetric_matmul(
        {p.a, p.a, p.b, p.work_dtype, in.batch, m, m, c, b, p.square_splits, p.split_partial, p.split_counters}, path,
        stream);
    if (s + 1 == steps) {  // the last step writes the unpadded result in the output dtype
      run_ns_update({p.b, x, p.out, p.work_dtype, p.out_dtype, in.batch, m, n, in.rows, in.cols, a}, path, stream);
    } else {
      run_ns_update({p.b, x, y, p.work_dtype, p.work_dtype, in.batch, m, n, m, n, a}, path, stream);
      std::swap(x, y);
    }
  }
}

}  // namespace muon_kernels
