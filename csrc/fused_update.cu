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
  int32_t scalar_index[kMaxTensors];  // index into the per-tensor fp32 scalar arrays
  uint8_t transposed[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
// Kernel arguments are limited to 4 KB on every CUDA version this builds with.
static_assert(sizeof(MultiTensorArgs) + 64 <= 4096, "multi-tensor table too large for kernel arguments");

// Element idx of tensor `slot`, row-major over its (batch, rows, cols) view → its place in the stack.
__device__ __forceinline__ int64_t stack_index(const MultiTensorArgs& args, int slot, int64_t idx) {
  const int64_t offset = args.stack_offset[slot];
  if (!args.transposed[slot]) return offset + idx;
  const int64_t rows = args.rows[slot], cols = args.cols[slot], per = rows * cols;
  const int64_t b = idx / per, rem = idx - b * per, r = rem / cols, c = rem - r * cols;
  return offset + b * per + c * rows + r;
}

// torch's lerp, branch for branch (it switches formula at |w| = 0.5 for accuracy).
__device__ __forceinline__ float lerp(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.f - w);
}

// The same operations and roundings as the torch reference: the gradient rounded to the buffer's
// dtype, lerp_ (or mul_ then add_) on the buffer, then the Nesterov blend, stored in the stack,
// which has the buffers' dtype (as torch.cat of the buffers would).
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
    const float g = round_to<M>(to_float(grad[idx]));
    float m = to_float(buf[idx]);
    m = ema ? lerp(m, g, weight) : round_to<M>(mu * m) + g;
    const M stored = from_float<M>(m);
    buf[idx] = stored;
    m = to_float(stored);
    const float u = !nesterov ? m : ema ? lerp(g, m, mu) : g + mu * m;
    stack[stack_index(args, slot, idx)] = from_float<M>(u);
  }
}

// W = round(W·decay) + alpha·round(O): O cast to the parameter's dtype first, then mul_ and add_.
// cautious: the decay only where W·O >= 0 (signs agree or either is zero), elsewhere a factor of 1.
template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) fused_apply_update_kernel(MultiTensorArgs args, const float* alphas,
                                                                      const float* decays, const S* stack,
                                                                      bool cautious) {
  const int slot = args.block_tensor[blockIdx.x];
  const int64_t start = int64_t(args.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, args.numel[slot]);
  P* param = static_cast<P*>(args.inout[slot]);
  const float alpha = alphas[args.scalar_index[slot]], decay = decays[args.scalar_index[slot]];
  for (int64_t idx = start + threadIdx.x; idx < end; idx += kThreads) {
    const float o = round_to<P>(to_float(stack[stack_index(args, slot, idx)]));
    const float w0 = to_float(param[idx]);
    const bool agree = (w0 >= 0.f) == (o >= 0.f) || w0 == 0.f || o == 0.f;
    const float w = round_to<P>(w0 * (cautious && !agree ? 1.f : decay));
    param[idx] = from_float<P>(w + alpha * o);
  }
}

void validate(const TensorList& list, bool with_grads, const char* what) {
  const size_t n = list.tensors.size();
  require(list.numels.size() == n && list.stack_offsets.size() == n && list.rows.size() == n &&
              list.cols.size() == n && list.transposed.size() == n && (!with_grads || list.grads.size() == n),
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
    args.scalar_index[s] = static_cast<int32_t>(t);
    args.transposed[s] = list.transposed[t];
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

void fused_apply_update(const TensorList& list, DType param_dtype, const float* alphas, const float* decays,
                        const void* stack, DType stack_dtype, bool cautious, cudaStream_t stream) {
  const char* what = "fused_apply_update";
  validate(list, false, what);
  require(alphas != nullptr && decays != nullptr && stack != nullptr,
          "fused_apply_update: alphas, decays and stack must be device pointers");
  dispatch_dtype(param_dtype, what, [&](auto p) {
    dispatch_dtype(stack_dtype, what, [&](auto s) {
      using P = decltype(p);
      using S = decltype(s);
      for_each_launch(list, false, [&](const MultiTensorArgs& args, int blocks) {
        fused_apply_update_kernel<P, S><<<blocks, kThreads, 0, stream>>>(args, alphas, decays,
                                                                         static_cast<const S*>(stack), cautious);
      });
    });
  });
  check_launch(what);
}

}  // namespace muon_kernels
