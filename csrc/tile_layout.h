// Where every element of a tensor-core GEMM tile lives: the shared-memory layout of an operand
// tile, which 16-byte chunk each thread copies into it, which shared row each lane hands to
// ldmatrix, and which output elements a lane's mma accumulators hold.
//
// Only index arithmetic lives here, callable from host and device, and gemm.cuh computes every
// shared address and output position through it. A host program
// (tests/csrc/warp_tile_emulation.cpp) replays a block's copies, ldmatrix loads and mma.sync
// products with these functions against the PTX ISA's fragment tables and checks the product
// exactly: the parts of the kernel that no CPU can run are checked where they can go wrong.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MUON_HD __host__ __device__ __forceinline__
#else
#define MUON_HD inline
#endif

namespace muon_kernels {
namespace tile {

// 16-bit elements per 16-byte chunk: the unit of cp.async, of vector loads and of an ldmatrix row.
constexpr int kChunk = 8;

struct Position {
  int row, col;
};

// An operand tile in shared memory: ROWS rows of CHUNKS 16-byte chunks, row-major, with each
// chunk's place in its row XOR-swizzled by the row. ldmatrix reads one matrix as 8 rows at the
// same logical chunk; the swizzle puts those 8 chunks in 8 distinct 16-byte bank groups, so every
// ldmatrix phase is conflict-free without the 25% of padding a skewed layout costs (shared
// memory per stage is what limits the pipeline to 3 stages and 2 blocks per SM).
template <int ROWS, int CHUNKS>
struct SwizzledTile {
  static_assert(CHUNKS == 4 || CHUNKS % 8 == 0, "rows of 64 bytes or of whole 128-byte lines");
  static constexpr int kRows = ROWS, kChunks = CHUNKS;
  static constexpr int kElements = ROWS * CHUNKS * kChunk;
  static constexpr int kCopies = ROWS * CHUNKS;  // 16-byte copies that fill the tile

  // 64-byte rows: two rows share a 128-byte line, so rows 2r and 2r+1 take the same XOR and the
  // line index (row/2) picks it. Wider rows: the low three bits of the chunk index by the row.
  MUON_HD static int swizzle(int row, int chunk) { return CHUNKS == 4 ? chunk ^ ((row >> 1) & 3) : chunk ^ (row & 7); }
  // Element offset of chunk `chunk` (logical) of row `row`.
  MUON_HD static int offset(int row, int chunk) { return (row * CHUNKS + swizzle(row, chunk)) * kChunk; }
  // Copy c (thread tid's i-th copy is c = tid + i·threads) fills this row and logical chunk:
  // consecutive threads read consecutive 16 bytes of a global row.
  MUON_HD static Position copy_position(int c) { return {c / CHUNKS, c % CHUNKS}; }
};

// The row and logical chunk lane `lane` hands to ldmatrix.x4 reading the 16-row × 2-chunk region
// at (row0, chunk0): matrix q takes its 8 row addresses from lanes 8q..8q+7 and lands in the
// lane's register q. rows_first: matrices 0..3 are (row half, chunk half) = (0,0), (1,0), (0,1),
// (1,1), the order of an A fragment (and of a k×n B fragment read with .trans); otherwise (0,0),
// (0,1), (1,0), (1,1): two n×k B fragments, one per 8 rows.
MUON_HD Position ldmatrix_x4_source(int lane, int row0, int chunk0, bool rows_first) {
  const int q = lane >> 3, r = lane & 7;
  const int row_half = rows_first ? (q & 1) : (q >> 1), chunk_half = rows_first ? (q >> 1) : (q & 1);
  return {row0 + row_half * 8 + r, chunk0 + chunk_half};
}

// Element e (0..3) of a lane's m16n8 fp32 accumulator: c0, c1 are row lane/4, columns 2·(lane%4)
// and the next one; c2, c3 the same columns 8 rows down. Pairs of adjacent columns let the
// epilogue store two elements at once.
MUON_HD Position accumulator_position(int lane, int e) { return {(lane >> 2) + (e >> 1) * 8, (lane & 3) * 2 + (e & 1)}; }

// A warp's WARP_M × WARP_N share of a block tile, as FRAG_M m16 fragments of A and FRAG_N n8
// fragments of B per 16-wide k step. A is a K-major tile (rows × k chunks). B is K-major (rows of
// Pᵀ, as in P·Pᵀ: n rows × k chunks, read without transposition) or N-major (a k × n panel, read
// with ldmatrix .trans); either way each ldmatrix.x4 yields two n8 fragments.
template <int WARP_M, int WARP_N, bool B_KMAJOR>
struct WarpTile {
  static_assert(WARP_M % 16 == 0 && WARP_N % 16 == 0, "whole m16 and n16 fragments");
  static constexpr int kFragM = WARP_M / 16, kFragN = WARP_N / 8;

  // A fragment i at k offset kk (a multiple of 16) of the warp in row slot warp_m.
  MUON_HD static Position a_source(int lane, int warp_m, int i, int kk) {
    return ldmatrix_x4_source(lane, warp_m * WARP_M + i * 16, kk / kChunk, true);
  }
  // B fragments 2j and 2j+1 at k offset kk of the warp in column slot warp_n.
  MUON_HD static Position b_source(int lane, int warp_n, int j, int kk) {
    const int n0 = warp_n * WARP_N + j * 16;
    return B_KMAJOR ? ldmatrix_x4_source(lane, n0, kk / kChunk, false) : ldmatrix_x4_source(lane, kk, n0 / kChunk, true);
  }
  // Where element e of accumulator (i, jn) lands in the block tile.
  MUON_HD static Position c_position(int lane, int warp_m, int warp_n, int i, int jn, int e) {
    const Position p = accumulator_position(lane, e);
    return {warp_m * WARP_M + i * 16 + p.row, warp_n * WARP_N + jn * 8 + p.col};
  }
};

// Split-K: k_tiles K steps cut into slices of ⌈k_tiles / splits⌉ steps (the last may be shorter).
MUON_HD int64_t slice_tiles(int64_t k_tiles, int64_t splits) { return (k_tiles + splits - 1) / splits; }
// The slices a requested split really makes, none of them empty: ⌈k_tiles / slice_tiles⌉ (at most
// the request, and with the same slice length, so a kernel told this count cuts K the same way).
MUON_HD int64_t effective_splits(int64_t k_tiles, int64_t requested) {
  const int64_t clamped = requested < 1 ? 1 : (requested > k_tiles ? k_tiles : requested);
  return (k_tiles + slice_tiles(k_tiles, clamped) - 1) / slice_tiles(k_tiles, clamped);
}

}  // namespace tile
}  // namespace muon_kernels
