// The block-level GEMM main loops behind every Newton–Schulz matmul: one block computes a
// kBlockM × kBlockN fp32 tile of A·B over the whole K extent and hands it to an epilogue functor
// two adjacent columns at a time (which adds, rounds and stores, mirrored or not).
//
// Operands are padded buffers (dims multiples of kPad, zeros in the padding), so nothing here
// checks bounds. A is always k-contiguous rows (row-major); B is either
//   K-major: rows of a row-major matrix, i.e. B = Pᵀ for P·Pᵀ, or
//   N-major: a k×n row-major panel, as in B·X.
#pragma once

#include "common.cuh"
#include "tile_layout.h"

namespace muon_kernels {

// Tensor cores through ldmatrix + mma.sync (sm_75+): fp16/bf16 operands, fp32 accumulators held
// in registers from the first k step to the epilogue. Every shared address and output position
// comes from tile_layout.h (XOR-swizzled tiles, conflict-free ldmatrix), which the host emulation
// test replays against the PTX fragment tables.
template <typename T, CodePath PATH, bool B_KMAJOR>
struct TensorCoreGemm {
  using Tiles = TensorCoreTiles<PATH>;
  static constexpr int BM = Tiles::kBlockM, BN = Tiles::kBlockN, BK = Tiles::kBlockK;
  static constexpr int kWarps = Tiles::kWarpsM * Tiles::kWarpsN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMinBlocksPerSM = Tiles::kMinBlocksPerSM;
  using ATile = tile::SwizzledTile<BM, BK / tile::kChunk>;
  using BTile = typename std::conditional<B_KMAJOR, tile::SwizzledTile<BN, BK / tile::kChunk>,
                                          tile::SwizzledTile<BK, BN / tile::kChunk>>::type;
  using Warp = tile::WarpTile<BM / Tiles::kWarpsM, BN / Tiles::kWarpsN, B_KMAJOR>;
  static constexpr int FRAG_M = Warp::kFragM, FRAG_N = Warp::kFragN;
  static constexpr int kStageElements = ATile::kElements + BTile::kElements;
  static constexpr int kSmemBytes = Tiles::kStages * kStageElements * static_cast<int>(sizeof(T));
  static constexpr int A_COPIES = ATile::kCopies / kThreads, B_COPIES = BTile::kCopies / kThreads;
  static_assert(sizeof(T) == 2, "tensor-core operands are 16-bit");
  static_assert(ATile::kCopies % kThreads == 0 && BTile::kCopies % kThreads == 0, "tiles must split evenly");
  static_assert(BK % 16 == 0 && kStageElements * sizeof(T) % 128 == 0, "whole k16 steps, 128-byte aligned stages");

  // Copy c's global source for the k tile starting at k0, and its shared offset.
  __device__ static const T* a_src(const T* a, int64_t lda, int c, int64_t k0) {
    const tile::Position p = ATile::copy_position(c);
    return a + p.row * lda + k0 + p.col * tile::kChunk;
  }
  __device__ static const T* b_src(const T* b, int64_t ldb, int c, int64_t k0) {
    const tile::Position p = BTile::copy_position(c);
    if (B_KMAJOR) return b + p.row * ldb + k0 + p.col * tile::kChunk;
    return b + (k0 + p.row) * ldb + p.col * tile::kChunk;
  }
  __device__ static int a_dst(int c) {
    const tile::Position p = ATile::copy_position(c);
    return ATile::offset(p.row, p.col);
  }
  __device__ static int b_dst(int c) {
    const tile::Position p = BTile::copy_position(c);
    return BTile::offset(p.row, p.col);
  }

  // One stage's BK of k: per 16-wide step, the warp's A and B fragments from shared memory, then
  // FRAG_M × FRAG_N mma.
  __device__ static void mma_stage(const T* As, const T* Bs, int lane, int wm, int wn,
                                   float (&acc)[FRAG_M][FRAG_N][4]) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t fa[FRAG_M][4], fb[FRAG_N][2];
#pragma unroll
      for (int i = 0; i < FRAG_M; ++i) {
        const tile::Position p = Warp::a_source(lane, wm, i, kk);
        ldmatrix_x4<false>(fa[i], As + ATile::offset(p.row, p.col));
      }
#pragma unroll
      for (int j = 0; j < FRAG_N / 2; ++j) {
        const tile::Position p = Warp::b_source(lane, wn, j, kk);
        uint32_t r[4];
        ldmatrix_x4<!B_KMAJOR>(r, Bs + BTile::offset(p.row, p.col));  // B·X's k×n panel: transposed
        fb[2 * j][0] = r[0];
        fb[2 * j][1] = r[1];
        fb[2 * j + 1][0] = r[2];
        fb[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
        for (int j = 0; j < FRAG_N; ++j) mma_16816<T>(acc[i][j], fa[i], fb[j]);
    }
  }

  // a: first row of this block's A panel; b: first row (K-major) or first column (N-major) of its
  // B panel; k: the shared extent (a multiple of BK). row0/col0 place the tile for the epilogue.
  template <typename Epilogue>
  __device__ static void run(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t k, unsigned char* smem,
                             int64_t batch, int64_t row0, int64_t col0, const Epilogue& epilogue) {
    T* stages = reinterpret_cast<T*>(smem);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wm = warp / Tiles::kWarpsN, wn = warp % Tiles::kWarpsN;
    float acc[FRAG_M][FRAG_N][4];
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
      for (int j = 0; j < FRAG_N; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    const int ktiles = static_cast<int>(k / BK);
    auto As = [&](int s) { return stages + s * kStageElements; };
    auto Bs = [&](int s) { return stages + s * kStageElements + ATile::kElements; };

    if constexpr (Tiles::kAsync) {
      // kStages-deep cp.async pipeline: tile kt+kStages-1 is in flight while tile kt is multiplied.
      auto issue = [&](int kt, int s) {
#pragma unroll
        for (int i = 0; i < A_COPIES; ++i) {
          const int c = tid + i * kThreads;
          cp_async_16(As(s) + a_dst(c), a_src(a, lda, c, int64_t(kt) * BK));
        }
#pragma unroll
        for (int i = 0; i < B_COPIES; ++i) {
          const int c = tid + i * kThreads;
          cp_async_16(Bs(s) + b_dst(c), b_src(b, ldb, c, int64_t(kt) * BK));
        }
      };
#pragma unroll
      for (int s = 0; s < Tiles::kStages - 1; ++s) {
        if (s < ktiles) issue(s, s);
        cp_async_commit();  // empty groups keep the group count in step with kt
      }
      for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<Tiles::kStages - 2>();
        __syncthreads();  // tile kt is visible to all; everyone is done with the stage refilled next
        const int next = kt + Tiles::kStages - 1;
        if (next < ktiles) issue(next, next % Tiles::kStages);
        cp_async_commit();
        mma_stage(As(kt % Tiles::kStages), Bs(kt % Tiles::kStages), lane, wm, wn, acc);
      }
      cp_async_wait<0>();
    } else {
      // Two stages staged through registers: the next tile's global loads are in flight while the
      // current stage is multiplied, then land in the other stage.
      uint4 ra[A_COPIES], rb[B_COPIES];
      auto load = [&](int kt) {
#pragma unroll
        for (int i = 0; i < A_COPIES; ++i)
          ra[i] = *reinterpret_cast<const uint4*>(a_src(a, lda, tid + i * kThreads, int64_t(kt) * BK));
#pragma unroll
        for (int i = 0; i < B_COPIES; ++i)
          rb[i] = *reinterpret_cast<const uint4*>(b_src(b, ldb, tid + i * kThreads, int64_t(kt) * BK));
      };
      auto store = [&](int s) {
#pragma unroll
        for (int i = 0; i < A_COPIES; ++i) *reinterpret_cast<uint4*>(As(s) + a_dst(tid + i * kThreads)) = ra[i];
#pragma unroll
        for (int i = 0; i < B_COPIES; ++i) *reinterpret_cast<uint4*>(Bs(s) + b_dst(tid + i * kThreads)) = rb[i];
      };
      load(0);
      store(0);
      __syncthreads();
      for (int kt = 0; kt < ktiles; ++kt) {
        if (kt + 1 < ktiles) load(kt + 1);
        mma_stage(As(kt % 2), Bs(kt % 2), lane, wm, wn, acc);
        if (kt + 1 < ktiles) store((kt + 1) % 2);
        __syncthreads();
      }
    }

    // Straight from the accumulators: each lane holds pairs of adjacent columns (c0, c1 and c2, c3).
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i) {
#pragma unroll
      for (int j = 0; j < FRAG_N; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const tile::Position p = Warp::c_position(lane, wm, wn, i, j, 2 * h);
          epilogue(batch, row0 + p.row, col0 + p.col, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        }
      }
    }
  }
};

// fp32 operands on the FMA units (the `ieee` precision the torch reference uses): 16×16 threads,
// each an 8×8 register tile; operands staged through registers into two shared stages.
template <bool B_KMAJOR>
struct SimtGemm {
  static constexpr int BM = SimtTiles::kBlockM, BN = SimtTiles::kBlockN, BK = SimtTiles::kBlockK;
  static constexpr int kThreads = SimtTiles::kThreads, TM = SimtTiles::kPerThread;
  static constexpr int kMinBlocksPerSM = SimtTiles::kMinBlocksPerSM;
  static constexpr int LDS = BM + 4;  // shared rows are k-major: [k][m] and [k][n]
  static constexpr int kStage = BK * LDS;
  static constexpr int kSmemBytes = 2 * 2 * kStage * static_cast<int>(sizeof(float));
  static_assert(BM == BN && BM * BK == 4 * kThreads && BM == 16 * TM, "one float4 per thread per operand");

  template <typename Epilogue>
  __device__ static void run(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k,
                             unsigned char* smem, int64_t batch, int64_t row0, int64_t col0,
                             const Epilogue& epilogue) {
    float* As = reinterpret_cast<float*>(smem);  // [2][BK][LDS]
    float* Bs = As + 2 * kStage;
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    // This thread's copies: A (and K-major B) rows r, k offsets q..q+3; N-major B row rb, cols qb..qb+3.
    const int r = tid / 2, q = (tid % 2) * 4, rb = tid / 32, qb = (tid % 32) * 4;
    float4 ra, rbv;
    // Source pointers advance by one k tile per load, so the loop keeps two pointers and one step
    // live instead of re-deriving 64-bit offsets from lda/ldb (registers are the limit here).
    const float* a_src = a + r * lda + q;
    const float* b_src = B_KMAJOR ? b + r * ldb + q : b + rb * ldb + qb;
    const int64_t b_step = B_KMAJOR ? BK : BK * ldb;
    auto load = [&]() {
      ra = *reinterpret_cast<const float4*>(a_src);
      rbv = *reinterpret_cast<const float4*>(b_src);
      a_src += BK;
      b_src += b_step;
    };
    auto store = [&](int s) {
      float* as = As + s * kStage;
      float* bs = Bs + s * kStage;
      as[(q + 0) * LDS + r] = ra.x;
      as[(q + 1) * LDS + r] = ra.y;
      as[(q + 2) * LDS + r] = ra.z;
      as[(q + 3) * LDS + r] = ra.w;
      if (B_KMAJOR) {
        bs[(q + 0) * LDS + r] = rbv.x;
        bs[(q + 1) * LDS + r] = rbv.y;
        bs[(q + 2) * LDS + r] = rbv.z;
        bs[(q + 3) * LDS + r] = rbv.w;
      } else {
        *reinterpret_cast<float4*>(bs + rb * LDS + qb) = rbv;
      }
    };
    float acc[TM][TM] = {};
    const int ktiles = static_cast<int>(k / BK);
    load();
    store(0);
    __syncthreads();
    for (int kt = 0; kt < ktiles; ++kt) {
      if (kt + 1 < ktiles) load();
      const float* as = As + (kt % 2) * kStage;
      const float* bs = Bs + (kt % 2) * kStage;
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float av[TM], bv[TM];
#pragma unroll
        for (int i = 0; i < TM; i += 4) {
          *reinterpret_cast<float4*>(av + i) = *reinterpret_cast<const float4*>(as + kk * LDS + ty * TM + i);
          *reinterpret_cast<float4*>(bv + i) = *reinterpret_cast<const float4*>(bs + kk * LDS + tx * TM + i);
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TM; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      if (kt + 1 < ktiles) store((kt + 1) % 2);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TM; j += 2)
        epilogue(batch, row0 + ty * TM + i, col0 + tx * TM + j, acc[i][j], acc[i][j + 1]);
  }
};

// The GEMM that runs operands of type T on a code path: tensor cores for 16-bit types, FMA for fp32.
template <typename T, CodePath PATH, bool B_KMAJOR>
struct GemmFor {
  using type = TensorCoreGemm<T, PATH, B_KMAJOR>;
};
template <CodePath PATH, bool B_KMAJOR>
struct GemmFor<float, PATH, B_KMAJOR> {
  using type = SimtGemm<B_KMAJOR>;
};

}  // namespace muon_kernels
