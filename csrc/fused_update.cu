// Multi-tensor kernels around Newton–Schulz (apex's multi-tensor-apply pattern): a table of
// tensor addresses and a block → (tensor, chunk) map travel by value in the kernel arguments, so
// one launch covers up to kMaxTensors tensors and kMaxBlocks chunks with no device-side table, and
// a CUDA graph can capture it. Math is fp32 in registers; indices are 64-bit.
#include <algorithm>
#include <string>

#include "common.cuh"

namespace muon_kernels {
namespace {

constexpr int kMaxTensors = 32;
constexpr int kMaxBlocks = 256;
constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kThreads = 512;

struct MultiTensorArgs {
  const void* in[kMaxTensors];  // momentum: gradients
  void* inout[kMaxTensors];     // momentum: buffers; update: parameters
  int64_t numel[kMaxTensors];
  int64_t stack_offset[kMaxTensors];
  int64_t rows[kMaxTensors];
  int64_t cols[kMaxTensors];
  int64_t row_stride[kMaxTensors];     // == cols for contiguous tensors
  int32_t scalar_index[kMaxTensors];  // index into the per-tensor fp32 scalar arrays
  uint8_t transposed[kMaxTensors];
  uint8_t neuron_cols[kMaxTensors];
  float* scales[kMaxTensors];          // low-precision momentum: int8 block scales
  const int64_t* steps[kMaxTensors];   // and stochastic rounding's step counters and seeds
  uint32_t seeds[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
// Kernel arguments are limited to 4 KB on every CUDA version this builds with.
static_assert(sizeof(MultiTensorArgs) + 64 <= 4096, "multi-tensor table too large for kernel arguments");

// Element idx of tensor `slot` → its offset in the tensor's memory: idx, or row·stride + col for a
// split piece that is a column block of a wider matrix.
__device__ __forceinline__ int64_t memory_index(const MultiTensorArgs& args, int slot, int64_t idx) {
  const int64_t cols = args.cols[slot], stride = args.row_stride[slot];
  return stride == cols ? idx : idx / cols * stride + idx % cols;
}

// Element idx of tensor `slot`, row-major over its (batch, rows, cols) view → its place in the stack.
__device__ __forceinline__ int64_t stack_index(const MultiTensorArgs& args, int slot, int64_t idx) {
  const int64_t offset = args.stack_offset[slot];
  if (!args.transposed[slot]) return offset + idx;
  const int64_t rows = args.rows[slot], cols = args.cols[slot], per = rows * cols;
  const int64_t b = idx / per, rem = idx - b * per, r = rem / cols, c = rem - r * cols;
  return offset + b * per + c * rows + r;
}

// The same operations and roundings as the torch reference: the gradient rounded to the buffer's
// dtype, lerp_ (or mul_ then add_) on the buffer, then the Nesterov blend, stored in the stack,
// which has the buffers' dtype (as torch.cat of the buffers would). Every rounding is spelled out
// (__fmul_rn, __fmaf_rn) so that nvcc's multiply-add contraction cannot fuse torch's mul_ then add_
// into one FMA: an FMA only where torch's op is one (lerp, add with alpha).
template <typename G, typename M>
__global__ void __launch_bounds__(kThreads) fused_momentum_kernel(MultiTensorArgs args, const float* momenta,
                                                                  M* stack, bool ema, bool nesterov) {
  const int slot = args.block_tensor[blockIdx.x];
  const int64_t start = int64_t(args.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, args.numel[slot]);
  const G* grad = static_cast<const G*>(args.in[slot]);
  M* buf = static_cast<M*>(args.inout[slot]);
  const float mu = momenta[2 * args.scalar_index[slot]];
  const float weight = momenta[2 * args.scalar_index[slot] + 1];  // fp32(1 - μ), rounded on the host as torch does
  for (int64_t idx = start + threadIdx.x; idx < end; idx += kThreads) {
    const int64_t mem = memory_index(args, slot, idx);
    const float g = round_to<M>(to_float(grad[mem]));
    float m = to_float(buf[mem]);
    m = ema ? lerp(m, g, weight) : round_to<M>(__fmul_rn(mu, m)) + g;
    const M stored = from_float<M>(m);
    buf[mem] = stored;
    m = to_float(stored);
    const float u = !nesterov ? m : ema ? lerp(g, m, mu) : __fmaf_rn(mu, m, g);
    stack[stack_index(args, slot, idx)] = from_float<M>(u);
  }
}

// lowbias32: the integer hash of muon_kernels/random_bits.py, on uint32.
__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// fmaxf drops a NaN: an int8 block's scale must be NaN where the block holds one, as torch's amax
// is in the reference (momentum_precision.py), and the Triton kernel's propagating max.
__device__ __forceinline__ float max_keeping_nan(float a, float b) { return a != a ? a : b != b ? b : fmaxf(a, b); }

constexpr int kQuantBlock = 256;  // int8 momentum: one fp32 scale per 256 values
// A block's scale is max|m| times fl32(1/127), the torch reference's constant (momentum_precision.py
// INV_127): torch on a GPU divides by a Python number as a product by its reciprocal, so all multiply.
constexpr float kInv127 = 0x1.020408p-7f;
static_assert(kChunk % kQuantBlock == 0 && kThreads % kQuantBlock == 0, "chunks must hold whole quantization blocks");

// Low-precision momentum (M: int8_t or __nv_bfloat16): the reference's arithmetic
// (muon_kernels/momentum_precision.py), stored bits identical to it. The loop runs the same number
// of times in every thread, because int8 needs a block-wide max per 256 values each iteration.
template <typename G, typename M>
__global__ void __launch_bounds__(kThreads) low_precision_momentum_kernel(MultiTensorArgs args, const float* momenta,
                                                                          void* stack_out, bool ema, bool nesterov,
                                                                          bool stochastic) {
  constexpr bool kInt8 = std::is_same<M, int8_t>::value;
  using S = typename std::conditional<kInt8, G, M>::type;  // the stack: gradients' dtype for int8
  const int slot = args.block_tensor[blockIdx.x];
  const int64_t start = int64_t(args.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, args.numel[slot]);
  const G* grad = static_cast<const G*>(args.in[slot]);
  M* buf = static_cast<M*>(args.inout[slot]);
  S* stack = static_cast<S*>(stack_out);
  float* scales = args.scales[slot];
  const float mu = momenta[2 * args.scalar_index[slot]];
  const float weight = momenta[2 * args.scalar_index[slot] + 1];
  const uint32_t key = stochastic ? hash32(hash32(static_cast<uint32_t>(*args.steps[slot])) ^ args.seeds[slot]) : 0u;
  __shared__ float warp_max[kThreads / 32];
  for (int64_t base = start; base < end; base += kThreads) {
    const int64_t idx = base + threadIdx.x;
    const bool valid = idx < end;
    const int64_t mem = memory_index(args, slot, idx);  // int8 buffers are whole, contiguous parameters
    const float g = valid ? to_float(grad[mem]) : 0.f;
    float old = 0.f;
    if (valid) old = kInt8 ? static_cast<float>(buf[idx]) * scales[idx / kQuantBlock] : to_float(buf[mem]);
    const float m = ema ? lerp(old, g, weight) : __fmul_rn(mu, old) + g;
    const uint32_t bits = stochastic ? hash32(static_cast<uint32_t>(idx) ^ key) : 0u;
    float stored;
    if constexpr (kInt8) {
      float a = valid ? fabsf(m) : 0.f;
      for (int offset = 16; offset > 0; offset /= 2) a = max_keeping_nan(a, __shfl_xor_sync(0xffffffffu, a, offset));
      if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = a;
      __syncthreads();
      const int first = threadIdx.x / kQuantBlock * (kQuantBlock / 32);
      float amax = 0.f;
      for (int w = first; w < first + kQuantBlock / 32; ++w) amax = max_keeping_nan(amax, warp_max[w]);
      __syncthreads();  // warp_max is rewritten next iteration
      const float scale = __fmul_rn(amax, kInv127);
      float y = m / (scale > 0.f ? scale : 1.f);
      y = stochastic ? floorf(y + static_cast<float>(bits >> 8) * 5.9604644775390625e-08f) : floorf(y + 0.5f);
      // A NaN (a block with a NaN or an infinity: its scale is NaN or inf) is stored as 0, what torch's
      // float -> int8 conversion gives it; fminf/fmaxf alone would make it -127.
      y = y != y ? 0.f : fminf(fmaxf(y, -127.f), 127.f);
      if (valid) {
        buf[idx] = static_cast<int8_t>(y);
        if (threadIdx.x % kQuantBlock == 0) scales[idx / kQuantBlock] = scale;
      }
      stored = y * scale;
    } else {
      // bf16: round up in magnitude with probability (dropped bits) / 2^16, NaN stays NaN
      const uint32_t raw = __float_as_uint(m);
      stored = m != m ? m : __uint_as_float((raw + (bits & 0xFFFFu)) & 0xFFFF0000u);
      if (valid) buf[mem] = from_float<M>(stored);
    }
    const float u = !nesterov ? stored : ema ? lerp(g, stored, mu) : __fmaf_rn(mu, stored, g);
    if (valid) stack[stack_index(args, slot, idx)] = from_float<S>(u);
  }
}

// W = round(W·decay) + alpha·round(O): O cast to the parameter's dtype first, then mul_ and add_.
// cautious: the decay only where W·O >= 0 (signs agree or either is zero), elsewhere a factor of 1.
// variant: O first becomes gains[k]·row_scale[k, neuron]·O; the hyperball then rounds W and
// multiplies it by shrink[k] (torch's add_ then mul_).
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) fused_apply_update_kernel(MultiTensorArgs args, const float* alphas,
                                                                      const float* decays, const S* stack,
                                                                      bool cautious, VariantFactors variant) {
  const int slot = args.block_tensor[blockIdx.x];
  const int64_t start = int64_t(args.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, args.numel[slot]);
  P* param = static_cast<P*>(args.inout[slot]);
  const float alpha = alphas[args.scalar_index[slot]], decay = decays[args.scalar_index[slot]];
  const int64_t per = args.rows[slot] * args.cols[slot], first = args.stack_offset[slot] / per;
  for (int64_t idx = start + threadIdx.x; idx < end; idx += kThreads) {
    float o = to_float(stack[stack_index(args, slot, idx)]);
    const int64_t k = first + idx / per;
    if (variant.gains != nullptr) o *= variant.gains[k];
    if (variant.row_scale != nullptr) {
      const int64_t rc = idx % per;
      o *= variant.row_scale[k * variant.nmax + (args.neuron_cols[slot] ? rc % args.cols[slot] : rc / args.cols[slot])];
    }
    o = round_to<P>(o);
    const int64_t mem = memory_index(args, slot, idx);
    const float w0 = to_float(param[mem]);
    const bool agree = (w0 >= 0.f) == (o >= 0.f) || w0 == 0.f || o == 0.f;
    const float w = round_to<P>(__fmul_rn(w0, cautious && !agree ? 1.f : decay));
    const float updated = __fmaf_rn(alpha, o, w);  // add_(O, alpha): one rounding
    param[mem] = from_float<P>(variant.shrink != nullptr ? round_to<P>(updated) * variant.shrink[k] : updated);
  }
}

void validate(const TensorList& list, bool with_grads, const char* what) {
  const size_t n = list.tensors.size();
  require(list.numels.size() == n && list.stack_offsets.size() == n && list.rows.size() == n &&
              list.cols.size() == n && list.transposed.size() == n && (!with_grads || list.grads.size() == n) &&
              (list.neuron_cols.empty() || list.neuron_cols.size() == n) &&
              (list.row_strides.empty() || list.row_strides.size() == n),
          std::string(what) + ": every per-tensor list must have one entry per tensor (" + std::to_string(n) + ")");
  for (size_t t = 0; t < n; ++t) {
    const std::string where = std::string(what) + ": tensor " + std::to_string(t);
    require(list.numels[t] >= 0 && list.rows[t] > 0 && list.cols[t] > 0 && list.stack_offsets[t] >= 0,
            where + " has a negative size or offset, or an empty matrix view");
    require(list.numels[t] % (list.rows[t] * list.cols[t]) == 0,
            where + ": numel " + std::to_string(list.numels[t]) + " is not a whole number of " +
                std::to_string(list.rows[t]) + "×" + std::to_string(list.cols[t]) + " matrices");
    if (list.numels[t] == 0) continue;
    require(list.tensors[t] != 0 && (!with_grads || list.grads[t] != 0), where + " is a null pointer");
  }
}

// Fills argument tables tensor by tensor, chunk by chunk, and launches whenever the block map or
// the tensor table is full; a tensor cut by a launch continues in slot 0 of the next one.
template <typename Launch>
void for_each_launch(const TensorList& list, bool with_grads, Launch&& launch) {
  MultiTensorArgs args;
  int slot = 0, blocks = 0;
  auto fill = [&](int s, size_t t) {
    args.in[s] = with_grads ? reinterpret_cast<const void*>(list.grads[t]) : nullptr;
    args.inout[s] = reinterpret_cast<void*>(list.tensors[t]);
    args.numel[s] = list.numels[t];
    args.stack_offset[s] = list.stack_offsets[t];
    args.rows[s] = list.rows[t];
    args.cols[s] = list.cols[t];
    args.row_stride[s] = list.row_strides.empty() ? list.cols[t] : list.row_strides[t];
    args.scalar_index[s] = static_cast<int32_t>(t);
    args.transposed[s] = list.transposed[t];
    args.neuron_cols[s] = list.neuron_cols.empty() ? 0 : list.neuron_cols[t];
    args.scales[s] = list.scales.empty() ? nullptr : reinterpret_cast<float*>(list.scales[t]);
    args.steps[s] = list.steps.empty() ? nullptr : reinterpret_cast<const int64_t*>(list.steps[t]);
    args.seeds[s] = list.seeds.empty() ? 0u : list.seeds[t];
  };
  for (size_t t = 0; t < list.tensors.size(); ++t) {
    if (list.numels[t] == 0) continue;
    fill(slot, t);
    const int64_t chunks = (list.numels[t] + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      args.block_tensor[blocks] = static_cast<uint8_t>(slot);
      args.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool last_chunk = chunk + 1 == chunks;
      if (blocks == kMaxBlocks || (last_chunk && slot == kMaxTensors - 1)) {
        launch(args, blocks);
        blocks = 0;
        if (last_chunk) {
          slot = -1;  // the next tensor starts a fresh table
        } else {
          slot = 0;
          fill(0, t);
        }
      }
    }
    ++slot;
  }
  if (blocks > 0) launch(args, blocks);
}

}  // namespace

void fused_momentum(const TensorList& list, DType grad_dtype, DType buf_dtype, const float* momenta, void* stack,
                    bool ema, bool nesterov, cudaStream_t stream) {
  const char* what = "fused_momentum";
  validate(list, true, what);
  require(momenta != nullptr && stack != nullptr, "fused_momentum: momenta and stack must be device pointers");
  require_dtype(grad_dtype, what);
  require(buf_dtype == grad_dtype || buf_dtype == DType::kFloat32,
          "fused_momentum: momentum buffers must have the gradients' dtype or float32 (codes " +
              std::to_string(static_cast<int>(grad_dtype)) + ", " + std::to_string(static_cast<int>(buf_dtype)) + ")");
  dispatch_dtype(grad_dtype, what, [&](auto g) {
    using G = decltype(g);
    auto run = [&](auto m) {
      using M = decltype(m);
      for_each_launch(list, true, [&](const MultiTensorArgs& args, int blocks) {
        fused_momentum_kernel<G, M><<<blocks, kThreads, 0, stream>>>(args, momenta, static_cast<M*>(stack), ema,
                                                                     nesterov);
      });
    };
    if (buf_dtype == DType::kFloat32) run(float{});
    else run(G{});
  });
  check_launch(what);
}

void low_precision_momentum(const TensorList& list, DType grad_dtype, const float* momenta, void* stack, bool ema,
                            bool nesterov, LowPrecisionMomentum low, cudaStream_t stream) {
  const char* what = "low_precision_momentum";
  validate(list, true, what);
  const size_t n = list.tensors.size();
  require(momenta != nullptr && stack != nullptr, "low_precision_momentum: momenta and stack must be device pointers");
  require(!low.int8 || list.scales.size() == n, "low_precision_momentum: int8 needs one scale array per tensor");
  require(!low.stochastic || (list.steps.size() == n && list.seeds.size() == n),
          "low_precision_momentum: stochastic rounding needs a step counter and a seed per tensor");
  require(low.int8 || low.stochastic, "low_precision_momentum: neither int8 nor stochastic: use fused_momentum");
  dispatch_dtype(grad_dtype, what, [&](auto g) {
    using G = decltype(g);
    for_each_launch(list, true, [&](const MultiTensorArgs& args, int blocks) {
      if (low.int8) {
        low_precision_momentum_kernel<G, int8_t><<<blocks, kThreads, 0, stream>>>(args, momenta, stack, ema, nesterov,
                                                                                  low.stochastic);
      } else {
        low_precision_momentum_kernel<G, __nv_bfloat16><<<blocks, kThreads, 0, stream>>>(args, momenta, stack, ema,
                                                                                         nesterov, true);
      }
    });
  });
  check_launch(what);
}

void fused_apply_update(const TensorList& list, DType param_dtype, const float* alphas, const float* decays,
                        const void* stack, DType stack_dtype, bool cautious, const VariantFactors& variant,
                        cudaStream_t stream) {
  const char* what = "fused_apply_update";
  validate(list, false, what);
  require(alphas != nullptr && decays != nullptr && stack != nullptr,
          "fused_apply_update: alphas, decays and stack must be device pointers");
  require(variant.row_scale == nullptr || (variant.gains != nullptr && variant.nmax > 0 && !list.neuron_cols.empty()),
          "fused_apply_update: row_scale needs gains, nmax > 0 and neuron_cols");
  require(variant.shrink == nullptr || variant.gains != nullptr, "fused_apply_update: shrink needs gains");
  dispatch_dtype(param_dtype, what, [&](auto p) {
    dispatch_dtype(stack_dtype, what, [&](auto s) {
      using P = decltype(p);
      using S = decltype(s);
      for_each_launch(list, false, [&](const MultiTensorArgs& args, int blocks) {
        fused_apply_update_kernel<P, S><<<blocks, kThreads, 0, stream>>>(args, alphas, decays,
                                                                         static_cast<const S*>(stack), cautious,
                                                                         variant);
      });
    });
  });
  check_launch(what);
}

}  // namespace muon_kernels
