// Replays one block of csrc/gemm.cuh's tensor-core GEMM on the host: every thread's 16-byte copies
// into the swizzled shared tiles, every warp's ldmatrix.x4 loads and mma.sync products, and the
// epilogue's output positions, all through the index functions of csrc/tile_layout.h, which the
// kernel uses for every address. ldmatrix and mma are emulated from the PTX ISA's own description
// ("Warp-level matrix load instruction: ldmatrix" and the m16n8k16 / m16n8k8 fragment tables for
// .f16/.bf16), written here independently of tile_layout.h. The product of small integers is
// exact, so the check is equality with the plain triple loop.
//
// Also checked: every shared element is written exactly once per stage, every ldmatrix phase
// reads 8 distinct 16-byte bank groups (no bank conflicts), every output element is produced by
// exactly one (lane, register), and the sm_75 split of an m16n8k16 product into two m16n8k8
// products (common.cuh: registers a0, a1 with b0, then a2, a3 with b1) equals the k16 product,
// and the split-K slices of newton_schulz.cu cover K exactly once with none empty.
//
// Exit status 0 and one "ok ..." line per check; the first failure prints and exits 1.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <type_traits>
#include <vector>

#include "tile_layout.h"

using namespace muon_kernels::tile;

namespace {

[[noreturn]] void fail(const char* what, int a, int b, int c) {
  std::printf("FAIL %s (%d, %d, %d)\n", what, a, b, c);
  std::exit(1);
}

// A 32-bit register holding two 16-bit elements: .x is the lower half (the element at the lower
// address, or the lower k / column index in a fragment).
struct Reg {
  long x, y;
};

// ---- the PTX ISA, independently of tile_layout.h ----------------------------------------------

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8q..8q+7 hold the addresses of rows
// 0..7 of matrix q; lane t's register q receives row t/4, elements 2(t%4) and 2(t%4)+1 of matrix
// q, or with .trans the elements (2(t%4), t/4) and (2(t%4)+1, t/4) (the matrix transposed).
void ldmatrix_x4(const std::vector<long>& smem, const int (&address)[32], bool trans, Reg (&out)[32][4]) {
  for (int q = 0; q < 4; ++q) {
    for (int t = 0; t < 32; ++t) {
      if (trans) {
        out[t][q] = {smem[address[8 * q + 2 * (t % 4)] + t / 4], smem[address[8 * q + 2 * (t % 4) + 1] + t / 4]};
      } else {
        const int row = address[8 * q + t / 4];
        out[t][q] = {smem[row + 2 * (t % 4)], smem[row + 2 * (t % 4) + 1]};
      }
    }
  }
}

// mma.m16n8k16 .row.col, f16/bf16 → f32: groupID g = t/4, threadID_in_group q = t%4.
// A (16×16): a0,a1 = (g, 2q..2q+1); a2,a3 = (g+8, 2q..); a4,a5 = (g, 2q+8..); a6,a7 = (g+8, 2q+8..).
// B (16×8, k × n): b0,b1 = (2q..2q+1, g); b2,b3 = (2q+8.., g).
// C (16×8): c0,c1 = (g, 2q..2q+1); c2,c3 = (g+8, 2q..).
void mma_m16n8k16(const Reg (&a)[32][4], const Reg (&b)[32][2], long (&c)[32][4]) {
  long A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r % 2) * 8, col = 2 * q + (r / 2) * 8;
      A[row][col] = a[t][r].x;
      A[row][col + 1] = a[t][r].y;
    }
    for (int r = 0; r < 2; ++r) {
      B[2 * q + r * 8][g] = b[t][r].x;
      B[2 * q + r * 8 + 1][g] = b[t][r].y;
    }
  }
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e / 2) * 8, col = 2 * q + e % 2;
      for (int k = 0; k < 16; ++k) c[t][e] += A[row][k] * B[k][col];
    }
  }
}

// mma.m16n8k8 .row.col, f16 → f32 (sm_75): A (16×8): a0,a1 = (g, 2q..2q+1); a2,a3 = (g+8, 2q..).
// B (8×8): b0,b1 = (2q..2q+1, g). C as for m16n8k16.
void mma_m16n8k8(const Reg (&a)[32][2], const Reg (&b)[32], long (&c)[32][4]) {
  long A[16][8], B[8][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int r = 0; r < 2; ++r) {
      A[g + r * 8][2 * q] = a[t][r].x;
      A[g + r * 8][2 * q + 1] = a[t][r].y;
    }
    B[2 * q][g] = b[t].x;
    B[2 * q + 1][g] = b[t].y;
  }
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e / 2) * 8, col = 2 * q + e % 2;
      for (int k = 0; k < 8; ++k) c[t][e] += A[row][k] * B[k][col];
    }
  }
}

// ---- the kernel's block, through tile_layout.h ------------------------------------------------

// csrc/common.cuh TensorCoreTiles and csrc/gemm.cuh TensorCoreGemm.
constexpr int BM = 128, BN = 128, BK = 32, kWarpsM = 2, kWarpsN = 2, kThreads = 32 * kWarpsM * kWarpsN;

// 8 distinct 16-byte bank groups among the 8 row addresses of each matrix (element offsets).
void check_conflict_free(const int (&address)[32], const char* what) {
  for (int q = 0; q < 4; ++q) {
    int seen = 0;
    for (int r = 0; r < 8; ++r) {
      const int a = address[8 * q + r];
      if (a % kChunk != 0) fail("ldmatrix row address not 16-byte aligned", q, r, a);
      seen |= 1 << ((a / kChunk) % 8);
    }
    if (seen != 0xFF) fail(what, q, seen, 0);
  }
}

// Copies a ROWS × (CHUNKS·8) window of `global` (row-major, leading dimension ld, window origin
// (r0, c0)) into a swizzled tile the way the kernel's threads do, checking full coverage.
template <typename Tile>
std::vector<long> fill_tile(const std::vector<long>& global, int ld, int r0, int c0) {
  std::vector<long> smem(Tile::kElements, 0);
  std::vector<int> writes(Tile::kElements, 0);
  for (int tid = 0; tid < kThreads; ++tid) {
    for (int i = 0; i < Tile::kCopies / kThreads; ++i) {
      const Position p = Tile::copy_position(tid + i * kThreads);
      const int dst = Tile::offset(p.row, p.col);
      for (int e = 0; e < kChunk; ++e) {
        smem[dst + e] = global[(r0 + p.row) * ld + c0 + p.col * kChunk + e];
        ++writes[dst + e];
      }
    }
  }
  for (int e = 0; e < Tile::kElements; ++e)
    if (writes[e] != 1) fail("a shared element is not written exactly once", e, writes[e], 0);
  return smem;
}

// C = A·Bᵀ (B_KMAJOR: B is n×k) or A·B (B is k×n) for one 128×128 block over K = kTiles·BK.
template <bool B_KMAJOR>
void check_block(std::mt19937& rng, int ktiles) {
  using ATile = SwizzledTile<BM, BK / kChunk>;
  using BTile = typename std::conditional<B_KMAJOR, SwizzledTile<BN, BK / kChunk>, SwizzledTile<BK, BN / kChunk>>::type;
  using Warp = WarpTile<BM / kWarpsM, BN / kWarpsN, B_KMAJOR>;
  const int K = ktiles * BK;
  std::uniform_int_distribution<int> value(-8, 8);
  std::vector<long> A(BM * K), B(BN * K);
  for (auto& v : A) v = value(rng);
  for (auto& v : B) v = value(rng);

  static long acc[kWarpsM * kWarpsN][32][Warp::kFragM][Warp::kFragN][4];
  for (auto& w : acc)
    for (auto& l : w)
      for (auto& i : l)
        for (auto& j : i)
          for (long& e : j) e = 0;
  for (int kt = 0; kt < ktiles; ++kt) {
    const std::vector<long> As = fill_tile<ATile>(A, K, 0, kt * BK);
    const std::vector<long> Bs = B_KMAJOR ? fill_tile<BTile>(B, K, 0, kt * BK) : fill_tile<BTile>(B, BN, kt * BK, 0);
    for (int warp = 0; warp < kWarpsM * kWarpsN; ++warp) {
      const int wm = warp / kWarpsN, wn = warp % kWarpsN;
      for (int kk = 0; kk < BK; kk += 16) {
        static Reg fa[Warp::kFragM][32][4], fb[Warp::kFragN][32][2];
        for (int i = 0; i < Warp::kFragM; ++i) {
          int address[32];
          for (int lane = 0; lane < 32; ++lane) {
            const Position p = Warp::a_source(lane, wm, i, kk);
            address[lane] = ATile::offset(p.row, p.col);
          }
          check_conflict_free(address, "A ldmatrix bank conflict");
          ldmatrix_x4(As, address, false, fa[i]);
        }
        for (int j = 0; j < Warp::kFragN / 2; ++j) {
          int address[32];
          for (int lane = 0; lane < 32; ++lane) {
            const Position p = Warp::b_source(lane, wn, j, kk);
            address[lane] = BTile::offset(p.row, p.col);
          }
          check_conflict_free(address, "B ldmatrix bank conflict");
          Reg r[32][4];
          ldmatrix_x4(Bs, address, !B_KMAJOR, r);
          for (int t = 0; t < 32; ++t) {  // gemm.cuh: fb[2j] = (r0, r1), fb[2j+1] = (r2, r3)
            fb[2 * j][t][0] = r[t][0];
            fb[2 * j][t][1] = r[t][1];
            fb[2 * j + 1][t][0] = r[t][2];
            fb[2 * j + 1][t][1] = r[t][3];
          }
        }
        for (int i = 0; i < Warp::kFragM; ++i) {
          for (int j = 0; j < Warp::kFragN; ++j) {
            long c[32][4];
            for (int t = 0; t < 32; ++t)
              for (int e = 0; e < 4; ++e) c[t][e] = acc[warp][t][i][j][e];
            mma_m16n8k16(fa[i], fb[j], c);
            for (int t = 0; t < 32; ++t)
              for (int e = 0; e < 4; ++e) acc[warp][t][i][j][e] = c[t][e];
          }
        }
      }
    }
  }

  // The epilogue: positions from c_position, elements e and e+1 (e even) side by side.
  std::vector<long> C(BM * BN, 0);
  std::vector<int> hits(BM * BN, 0);
  for (int warp = 0; warp < kWarpsM * kWarpsN; ++warp) {
    const int wm = warp / kWarpsN, wn = warp % kWarpsN;
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < Warp::kFragM; ++i)
        for (int j = 0; j < Warp::kFragN; ++j)
          for (int e = 0; e < 4; ++e) {
            const Position p = Warp::c_position(lane, wm, wn, i, j, e);
            if (p.row < 0 || p.row >= BM || p.col < 0 || p.col >= BN) fail("output outside the block", p.row, p.col, e);
            if (e % 2 == 1) {
              const Position first = Warp::c_position(lane, wm, wn, i, j, e - 1);
              if (first.row != p.row || first.col + 1 != p.col || first.col % 2 != 0)
                fail("accumulator pair is not two adjacent columns from an even one", lane, e, p.col);
            }
            C[p.row * BN + p.col] = acc[warp][lane][i][j][e];
            ++hits[p.row * BN + p.col];
          }
  }
  for (int r = 0; r < BM; ++r)
    for (int c = 0; c < BN; ++c) {
      if (hits[r * BN + c] != 1) fail("output element not produced exactly once", r, c, hits[r * BN + c]);
      long want = 0;
      for (int k = 0; k < K; ++k) want += A[r * K + k] * (B_KMAJOR ? B[c * K + k] : B[k * BN + c]);
      if (C[r * BN + c] != want) fail(B_KMAJOR ? "P·Pᵀ-shaped product differs" : "B·X-shaped product differs", r, c, 0);
    }
  std::printf("ok %s block product over %d k tiles\n", B_KMAJOR ? "K-major" : "N-major", ktiles);
}

void check_sm75_split(std::mt19937& rng) {
  std::uniform_int_distribution<int> value(-100, 100);
  for (int trial = 0; trial < 100; ++trial) {
    Reg a[32][4], b[32][2];
    for (auto& lane : a)
      for (Reg& r : lane) r = {value(rng), value(rng)};
    for (auto& lane : b)
      for (Reg& r : lane) r = {value(rng), value(rng)};
    long k16[32][4] = {}, k8[32][4] = {};
    mma_m16n8k16(a, b, k16);
    for (int h = 0; h < 2; ++h) {  // common.cuh mma_16816 below sm_80: {a[2h], a[2h+1]} with b[h]
      Reg ah[32][2], bh[32];
      for (int t = 0; t < 32; ++t) {
        ah[t][0] = a[t][2 * h];
        ah[t][1] = a[t][2 * h + 1];
        bh[t] = b[t][h];
      }
      mma_m16n8k8(ah, bh, k8);
    }
    for (int t = 0; t < 32; ++t)
      for (int e = 0; e < 4; ++e)
        if (k8[t][e] != k16[t][e]) fail("two m16n8k8 products differ from one m16n8k16", trial, t, e);
  }
  std::printf("ok sm_75 split of m16n8k16 into two m16n8k8\n");
}

// Split-K slicing (csrc/newton_schulz.cu): the host launches effective_splits slices, each block
// takes slice_tiles(k_tiles, that count) K steps from slice · length. The slices must cover K
// exactly once, none empty, never more than requested.
void check_split_slices() {
  for (int64_t k_tiles = 1; k_tiles <= 512; ++k_tiles) {
    for (int64_t requested = 1; requested <= 20; ++requested) {
      const int64_t count = effective_splits(k_tiles, requested);
      if (count < 1 || count > requested) fail("split count outside [1, requested]", int(k_tiles), int(requested), int(count));
      const int64_t length = slice_tiles(k_tiles, count);
      int64_t covered = 0;
      for (int64_t s = 0; s < count; ++s) {
        const int64_t k0 = s * length, extent = std::min(length, k_tiles - k0);
        if (k0 != covered || extent < 1) fail("split slices do not tile K", int(k_tiles), int(requested), int(s));
        covered += extent;
      }
      if (covered != k_tiles) fail("split slices do not cover K", int(k_tiles), int(requested), int(covered));
    }
  }
  std::printf("ok split-K slices cover K exactly, none empty\n");
}

}  // namespace

int main() {
  std::mt19937 rng(20261205);
  check_block<true>(rng, 1);
  check_block<true>(rng, 3);
  check_block<false>(rng, 1);
  check_block<false>(rng, 3);
  check_sm75_split(rng);
  check_split_slices();
  return 0;
}
