// The statistics pass of the post-orthogonalization variants (NorMuon, hyperball; see kernels.h
// and muon_kernels/variants.py). One block per (matrix, kVariantNeurons neurons), one warp per
// neuron: lanes stride the neuron's inputs, a fixed butterfly reduces them (deterministic, no
// atomics), lane 0 updates NorMuon's v and s, and the block's partial sums go to `partials`.
#include <string>

#include "common.cuh"

namespace muon_kernels {
namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename S, typename P>
__global__ void __launch_bounds__(kVariantNeurons * kWarp) variant_statistics_kernel(VariantStatisticsParams p,
                                                                                      int64_t blocks) {
  // (matrix, block of neurons) folded into grid x: y stops at 65,535 blocks (n = 524,280 neurons).
  const int64_t k = blockIdx.x / blocks, nb = blockIdx.x - k * blocks;
  const int64_t* row = p.table + k * kVariantTableColumns;
  const int64_t rows = row[2], cols = row[3], row_stride = row[6];
  const bool transposed = row[4] != 0, neuron_cols = row[5] != 0;
  const int64_t count = neuron_cols ? cols : rows, other = neuron_cols ? rows : cols;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t i = nb * kVariantNeurons + warp;
  const S* ortho = static_cast<const S*>(p.ortho) + k * p.m * p.n;
  const P* param = reinterpret_cast<const P*>(row[0]);
  float q = 0.f, wo = 0.f, w2 = 0.f;
  if (i < count) {
    for (int64_t j = lane; j < other; j += kWarp) {
      const int64_t r = neuron_cols ? j : i, c = neuron_cols ? i : j;
      const float o = to_float(ortho[transposed ? c * rows + r : r * cols + c]);
      q += o * o;
      if (p.hyperball) {
        const float w = to_float(param[r * row_stride + c]);
        wo += w * o;
        w2 += w * w;
      }
    }
  }
  q = warp_sum(q);
  wo = warp_sum(wo);
  w2 = warp_sum(w2);
  __shared__ float sums[kVariantNeurons][4];
  if (lane == 0) {
    float s = 1.f;
    if (p.normuon && i < count) {
      float* v = reinterpret_cast<float*>(row[1]) + i;
      *v = lerp(*v, q / static_cast<float>(other), p.weight);
      s = 1.f / (sqrtf(*v) + p.eps);
      p.row_scale[k * p.n + i] = s;
    }
    if (i >= count) s = 0.f;
    sums[warp][0] = q;
    sums[warp][1] = s * s * q;
    sums[warp][2] = s * wo;
    sums[warp][3] = w2;
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    float total = 0.f;
    for (int w = 0; w < kVariantNeurons; ++w) total += sums[w][threadIdx.x];
    p.partials[(k * blocks + nb) * 4 + threadIdx.x] = total;
  }
}

}  // namespace

void variant_statistics(const VariantStatisticsParams& p, cudaStream_t stream) {
  const char* what = "variant_statistics";
  require(p.ortho != nullptr && p.table != nullptr && p.partials != nullptr,
          "variant_statistics: ortho, table and partials must be device pointers");
  require(!p.normuon || p.row_scale != nullptr, "variant_statistics: NorMuon needs row_scale");
  require(p.matrices >= 0 && p.m > 0 && p.n >= p.m, "variant_statistics: the stack must be (matrices, m, n), m <= n");
  const int64_t blocks = (p.n + kVariantNeurons - 1) / kVariantNeurons;
  require(p.matrices <= kMaxGridX / blocks, "variant_statistics: " + std::to_string(p.matrices) + " matrices of " +
                                               std::to_string(blocks) + " neuron blocks exceed the grid's x limit");
  if (p.matrices == 0) return;
  dispatch_dtype(p.ortho_dtype, what, [&](auto s) {
    dispatch_dtype(p.param_dtype, what, [&](auto w) {
      using S = decltype(s);
      using P = decltype(w);
      const dim3 grid(static_cast<unsigned>(p.matrices * blocks));
      variant_statistics_kernel<S, P><<<grid, kVariantNeurons * kWarp, 0, stream>>>(p, blocks);
    });
  });
  check_launch(what);
}

}  // namespace muon_kernels
