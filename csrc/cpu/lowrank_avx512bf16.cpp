// AVX512-BF16 micro-kernels of bfloat16 lowrank_linear (see
// lowrank_avx512bf16.h).
//
// Shrink, two forms:
// * shrink(): the same register-blocked dot tile as the AVX2 shrink, on
//   512-bit vectors of 32 bfloat16 values: a tile of 4 rows of x by 4 rows of
//   A keeps 16 float32 accumulators and loads 8 vectors per 16 vdpbf16ps. The
//   16 lanes of an accumulator are folded into one sum only once per chunk of
//   k. It reads A in place, so it suits few rows.
// * shrink_packed(): a broadcast tile, the mirror of the expand's. A is packed
//   once per call into pairs, 64 ranks per group, and each pair of a row of x
//   is broadcast against the group's four vectors: 6 rows × 64 ranks keep 24
//   accumulators over all of k, with no horizontal sums and 10 loads per 24
//   vdpbf16ps (the dot tile's A chunks come from L2 at 16 loads per 32). It
//   runs at 94 % of this core's vdpbf16ps peak where the dot tile ran at
//   about 80 %, and repays the packing from a few hundred rows.
//
// Expand: a broadcast tile. B is packed 32 outputs at a time into a panel of
// bfloat16 pairs, P[q][c] = (B[o + c, 2q], B[o + c, 2q + 1]), and each pair of
// a row's rounded intermediate, (t[i, 2q], t[i, 2q + 1]), is broadcast
// against two panel vectors: a tile of 12 rows × 32 outputs keeps 24
// accumulators, which start from the bias, and needs no horizontal sums. Its
// sums are rounded to bfloat16 by vcvtne2ps2bf16 unless a tile holds a NaN or
// a subnormal (see expand_tile).
//
// Only <immintrin.h> and standard headers are included: the whole file is
// compiled for AVX-512, and nothing here may run without the runtime check in
// cpu_has_avx512bf16(). Built on x86 only (x86_kernels.h).
#include "x86_kernels.h"
#if LOWRANK_EXT_X86_KERNELS
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")

#include "lowrank_avx512bf16.h"

// GCC 12 warns that the undefined upper half behind _mm512_castps512_ps256 is
// uninitialized; it is never read.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

namespace lowrank_ext {
namespace avx512bf16 {
namespace {

// Local, like the one in lowrank_avx2.cpp: a shared inline helper compiled
// here would be an AVX-512 copy that the linker could hand to portable code.
inline int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Rows of x and of A per tile.
constexpr int kMR = 4;
constexpr int kNR = 4;
// bfloat16 values per vector.
constexpr int64_t kLanes = 32;
// Contraction chunk: 4 rows of x (16 KB) stay in L1 and a chunk of A
// (r × 2048 values, 256 KB at r = 64) in L2 while a row block is processed.
constexpr int64_t kKChunk = 2048;

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

inline __m256 halves_added(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return _mm256_add_ps(lo, hi);
}

// Lane j of the result is the sum of all lanes of accumulator j.
inline __m128 fold4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 abcd = _mm256_hadd_ps(
      _mm256_hadd_ps(halves_added(a), halves_added(b)),
      _mm256_hadd_ps(halves_added(c), halves_added(d)));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Zeroes a tile's accumulators; always inlined and unrolled, so that they
// stay in registers.
template <int R, int C>
__attribute__((always_inline)) inline void set_zero(__m512 (&acc)[R][C]) {
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < C; ++j) {
      acc[i][j] = _mm512_setzero_ps();
    }
  }
}

// acc[i][j] += the pairwise products of X[i, p..p+32) and W[j, p..p+32);
// masked loads read only the lanes in `mask` and zero the rest.
template <int MR, int NR, bool kMasked>
__attribute__((always_inline)) inline void dot_step(
    const uint16_t* X, int64_t ldx, const uint16_t* W, int64_t ldw, __mmask32 mask,
    __m512 (&acc)[MR][kNR]) {
  __m512i xv[MR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    xv[i] = kMasked ? _mm512_maskz_loadu_epi16(mask, X + i * ldx)
                    : _mm512_loadu_si512(X + i * ldx);
  }
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) {
    const __m512i w = kMasked ? _mm512_maskz_loadu_epi16(mask, W + j * ldw)
                              : _mm512_loadu_si512(W + j * ldw);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      acc[i][j] = dot_pairs(acc[i][j], xv[i], w);
    }
  }
}

// t[i][j] (+)= Σ_p X[i, p] · W[j, p] over p in [0, K), for an MR × NR tile.
template <int MR, int NR>
void shrink_tile(
    const uint16_t* X, int64_t ldx, const uint16_t* W, int64_t ldw, int64_t K, float* t,
    int64_t ldt, bool accumulate) {
  __m512 acc[MR][kNR];
  set_zero(acc);
  const int64_t K32 = K & ~(kLanes - 1);
  for (int64_t p = 0; p < K32; p += kLanes) {
    dot_step<MR, NR, false>(X + p, ldx, W + p, ldw, 0, acc);
  }
  if (K32 < K) {  // the tail of K: zeros beyond it add nothing
    const __mmask32 mask = _cvtu32_mask32((1u << (K - K32)) - 1);
    dot_step<MR, NR, true>(X + K32, ldx, W + K32, ldw, mask, acc);
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    float sums[4];
    _mm_storeu_ps(sums, fold4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    for (int j = 0; j < NR; ++j) {
      t[i * ldt + j] = accumulate ? t[i * ldt + j] + sums[j] : sums[j];
    }
  }
}

// Tile functions indexed by [rows - 1][cols - 1], for the edges of a block.
using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*,
                        int64_t, bool);
constexpr TileFn kTiles[kMR][kNR] = {
    {shrink_tile<1, 1>, shrink_tile<1, 2>, shrink_tile<1, 3>, shrink_tile<1, 4>},
    {shrink_tile<2, 1>, shrink_tile<2, 2>, shrink_tile<2, 3>, shrink_tile<2, 4>},
    {shrink_tile<3, 1>, shrink_tile<3, 2>, shrink_tile<3, 3>, shrink_tile<3, 4>},
    {shrink_tile<4, 1>, shrink_tile<4, 2>, shrink_tile<4, 3>, shrink_tile<4, 4>}};

// ---------------------------------------------------------------- expand

constexpr int kExpandRows = 12;
constexpr int kPanelCols = kExpandPanelCols;

// Round to nearest even with NaN kept quiet, exactly as c10::BFloat16 does
// (vcvtneps2bf16 would flush subnormals).
inline __m256i round_to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(u);
}

// 16 bfloat16 values (fewer under `mask`) widened to float32; zeros beyond.
inline __m512 load16_widened(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The pairs (t[i, 2q], t[i, 2q + 1]) rounded to bfloat16, zero past r, laid
// out tile by tile of kExpandRows rows: in the tile of rows [i0, i0 + mr),
// pair q of row i0 + i is word tb[i0·pairs + q·mr + i]. A tile's broadcasts
// then all come from one pointer with constant offsets (12 row pointers
// would not fit the general registers beside the rest).
void round_intermediate(const float* t, int64_t ldt, int64_t rows, int64_t r, uint32_t* tb) {
  const int64_t pairs = (r + 1) / 2;
  uint16_t row[2 * 16];
  for (int64_t i0 = 0; i0 < rows; i0 += kExpandRows) {
    const int64_t mr = min64(kExpandRows, rows - i0);
    uint32_t* tile = tb + i0 * pairs;
    for (int64_t i = 0; i < mr; ++i) {
      const float* ti = t + (i0 + i) * ldt;
      for (int64_t j = 0; j < r; j += 16) {
        const int64_t n = min64(16, r - j);
        const __mmask16 mask = _cvtu32_mask16((1u << n) - 1);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row),
                            round_to_bf16(_mm512_maskz_loadu_ps(mask, ti + j)));
        for (int64_t q = j / 2; q < (j + n + 1) / 2; ++q) {
          // lanes past n are zero: the maskz load zeroes them before rounding
          tile[q * mr + i] = row[2 * q - j] | static_cast<uint32_t>(row[2 * q - j + 1]) << 16;
        }
      }
    }
  }
}

// Transposes a 16 × 16 block of 32-bit words held one row per register.
inline void transpose16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Now v[4a + b] holds, in 128-bit lane L, column 4L + b of rows 4a..4a+3.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(v[i], v[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    v[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    v[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// P[q][c] = (B[o + c, 2q], B[o + c, 2q + 1]) for c < nc, zero elsewhere.
void pack_pairs(const uint16_t* B, int64_t r, int64_t o, int64_t nc, uint32_t* P) {
  const int64_t pairs = (r + 1) / 2;
  if (nc == kPanelCols && r % 2 == 0) {
    // With an even rank each row of B is `pairs` whole words, and the panel
    // is the transpose of that (32 × pairs) word matrix: 16 × 16 blocks.
    for (int64_t q0 = 0; q0 < pairs; q0 += 16) {
      const int64_t nq = min64(16, pairs - q0);
      const __mmask16 mask = _cvtu32_mask16((1u << nq) - 1);
      for (int64_t c0 = 0; c0 < kPanelCols; c0 += 16) {
        __m512i v[16];
        for (int c = 0; c < 16; ++c) {
          v[c] = _mm512_maskz_loadu_epi32(mask, B + (o + c0 + c) * r + 2 * q0);
        }
        transpose16(v);
        for (int64_t q = 0; q < nq; ++q) {
          _mm512_storeu_si512(P + (q0 + q) * kPanelCols + c0, v[q]);
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < kPanelCols; ++c) {
    if (c >= nc) {
      for (int64_t q = 0; q < pairs; ++q) {
        P[q * kPanelCols + c] = 0;
      }
      continue;
    }
    const uint16_t* row = B + (o + c) * r;
    for (int64_t q = 0; q < r / 2; ++q) {
      P[q * kPanelCols + c] = row[2 * q] | static_cast<uint32_t>(row[2 * q + 1]) << 16;
    }
    if (r % 2 != 0) {
      P[(pairs - 1) * kPanelCols + c] = row[r - 1];
    }
  }
}

// y[i, o + c] = (Σ_q tb[i][q] · P[q][c]) + bias for MR rows and the columns
// in the masks m0 (c < 16) and m1 (16 ≤ c < 32).
template <int MR>
void expand_tile(
    const uint32_t* tb, int64_t pairs, const uint32_t* P, __m512 bias0, __m512 bias1,
    __mmask16 m0, __mmask16 m1, uint16_t* y, int64_t ldy) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512i p0 = _mm512_loadu_si512(P + q * kPanelCols);
    const __m512i p1 = _mm512_loadu_si512(P + q * kPanelCols + 16);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512i pair = _mm512_set1_epi32(static_cast<int>(tb[q * MR + i]));
      acc0[i] = dot_pairs(acc0[i], pair, p0);
      acc1[i] = dot_pairs(acc1[i], pair, p1);
    }
  }
  // The bias last, as the other paths add it (a sum started from the bias
  // can overflow where the result does not).
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    acc0[i] = _mm512_add_ps(acc0[i], bias0);
    acc1[i] = _mm512_add_ps(acc1[i], bias1);
  }
  // vcvtne2ps2bf16 rounds 32 sums at once to nearest even, as c10::BFloat16
  // does, except that it flushes subnormals to zero and keeps NaN payloads
  // where c10 writes one quiet NaN: a tile holding either (one vfpclassps per
  // accumulator tells) is rounded the exact, slower way. (vdpbf16ps has
  // already flushed subnormal sums; a subnormal here comes from a bias that
  // cancels the sum, or a NaN from the inputs.)
  // The hardware rounding takes a third of the epilogue's instructions.
  // Unrolled, so that the accumulators are rounded straight from registers (a
  // loop spills all of them to the stack first: 10 % of the expand).
  constexpr int kSpecial = 0x01 | 0x20 | 0x80;  // quiet NaN, subnormal, signalling NaN
  __mmask16 special = 0;
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    special |= _mm512_fpclass_ps_mask(acc0[i], kSpecial);
    special |= _mm512_fpclass_ps_mask(acc1[i], kSpecial);
  }
  if (__builtin_expect(special == 0, 1)) {
    const __mmask32 mask = _mm512_kunpackw(m1, m0);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512bh rounded = _mm512_cvtne2ps_pbh(acc1[i], acc0[i]);
      _mm512_mask_storeu_epi16(y + i * ldy, mask, reinterpret_cast<__m512i>(rounded));
    }
    return;
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    _mm256_mask_storeu_epi16(y + i * ldy, m0, round_to_bf16(acc0[i]));
    _mm256_mask_storeu_epi16(y + i * ldy + 16, m1, round_to_bf16(acc1[i]));
  }
}

using ExpandTileFn = void (*)(const uint32_t*, int64_t, const uint32_t*, __m512, __m512,
                              __mmask16, __mmask16, uint16_t*, int64_t);
constexpr ExpandTileFn kExpandTiles[kExpandRows] = {
    expand_tile<1>, expand_tile<2>, expand_tile<3>, expand_tile<4>,
    expand_tile<5>, expand_tile<6>, expand_tile<7>, expand_tile<8>,
    expand_tile<9>, expand_tile<10>, expand_tile<11>, expand_tile<12>};

} // namespace

void shrink(
    const uint16_t* x, int64_t ldx, const uint16_t* A, int64_t k, int64_t rows,
    int64_t j0, int64_t j1, float* t, int64_t ldt) {
  for (int64_t p0 = 0; p0 < k; p0 += kKChunk) {
    const int64_t kc = min64(kKChunk, k - p0);
    for (int64_t i = 0; i < rows; i += kMR) {
      const int64_t mr = min64(kMR, rows - i);
      for (int64_t j = j0; j < j1; j += kNR) {
        const int64_t nr = min64(kNR, j1 - j);
        kTiles[mr - 1][nr - 1](
            x + i * ldx + p0, ldx, A + j * k + p0, k, kc, t + i * ldt + j, ldt, p0 > 0);
      }
    }
  }
}

namespace {

// ---------------------------------------------------------------- packed shrink

// Rows per broadcast tile for 1–4 vectors of 16 ranks: at most 24
// accumulators, which leaves registers for the vectors of A.
constexpr int kBroadcastRows[4] = {12, 12, 8, 6};
constexpr int kMaxBroadcastRows = 12;

// The group of ranks [g·64, ...) of packed A: whole groups before it.
inline int64_t packed_group_offset(int64_t g, int64_t pairs) {
  return g * kShrinkGroupRanks * pairs;
}

// Vectors of 16 ranks in group g.
inline int64_t group_vectors(int64_t g, int64_t r) {
  return (min64(kShrinkGroupRanks, r - g * kShrinkGroupRanks) + 15) / 16;
}

// acc[i][v] += pair q of row i of x (x[2q], x[2q + 1]), broadcast, against
// vector v of the packed pair panel P; kHalf: the last pair of an odd k,
// (x[2q], 0), so that nothing past the row is read. memcpy because x is only
// 2-byte aligned.
template <int MR, int NV, bool kHalf>
__attribute__((always_inline)) inline void broadcast_step(
    const uint16_t* x, int64_t ldx, const uint32_t* P, int64_t q, __m512 (&acc)[MR][NV]) {
  __m512i a[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    a[v] = _mm512_loadu_si512(P + 16 * v);
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    uint32_t word = x[i * ldx + 2 * q];
    if (!kHalf) {
      std::memcpy(&word, x + i * ldx + 2 * q, sizeof(word));
    }
    const __m512i pair = _mm512_set1_epi32(static_cast<int>(word));
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = dot_pairs(acc[i][v], pair, a[v]);
    }
  }
}

// t[i, 16v + c] = Σ_q pair q of row i of x · P[q][16v + c] for MR rows and NV
// vectors of ranks; P holds `width` words per pair. `last` masks the ranks of
// the last vector that exist.
template <int MR, int NV>
void broadcast_shrink_tile(
    const uint16_t* x, int64_t ldx, const uint32_t* P, int64_t width, int64_t k, float* t,
    int64_t ldt, __mmask16 last) {
  __m512 acc[MR][NV];
  set_zero(acc);
  const int64_t whole_pairs = k / 2;
  for (int64_t q = 0; q < whole_pairs; ++q) {
    broadcast_step<MR, NV, false>(x, ldx, P + q * width, q, acc);
  }
  if (k % 2 != 0) {
    broadcast_step<MR, NV, true>(x, ldx, P + whole_pairs * width, whole_pairs, acc);
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      _mm512_mask_storeu_ps(t + i * ldt + 16 * v, v == NV - 1 ? last : 0xFFFF, acc[i][v]);
    }
  }
}

using BroadcastTileFn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, int64_t,
                                 float*, int64_t, __mmask16);

// Tiles indexed by [vectors - 1][rows - 1]; rows past a vector count's
// limit repeat its largest tile and are never used. (Plain arrays: library
// templates instantiated in this file would be AVX-512 copies.)
template <int MR, int NV>
constexpr BroadcastTileFn kTileFor =
    broadcast_shrink_tile<(MR < kBroadcastRows[NV - 1] ? MR : kBroadcastRows[NV - 1]), NV>;
#define LOWRANK_BROADCAST_TILES(NV)                                                        \
  {kTileFor<1, NV>, kTileFor<2, NV>, kTileFor<3, NV>, kTileFor<4, NV>, kTileFor<5, NV>,    \
   kTileFor<6, NV>, kTileFor<7, NV>, kTileFor<8, NV>, kTileFor<9, NV>, kTileFor<10, NV>,   \
   kTileFor<11, NV>, kTileFor<12, NV>}
constexpr BroadcastTileFn kBroadcastTiles[4][kMaxBroadcastRows] = {
    LOWRANK_BROADCAST_TILES(1), LOWRANK_BROADCAST_TILES(2), LOWRANK_BROADCAST_TILES(3),
    LOWRANK_BROADCAST_TILES(4)};
#undef LOWRANK_BROADCAST_TILES

} // namespace

void pack_shrink_weights(
    const uint16_t* A, int64_t r, int64_t k, int64_t q0, int64_t q1, uint32_t* packed) {
  const int64_t pairs = (k + 1) / 2;
  for (int64_t g = 0; g * kShrinkGroupRanks < r; ++g) {
    const int64_t vectors = group_vectors(g, r);
    const int64_t width = 16 * vectors;
    uint32_t* P = packed + packed_group_offset(g, pairs);
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t j0 = g * kShrinkGroupRanks + 16 * v;
      // Each 16 × 16 block: 16 ranks' words for 16 pairs, transposed. A
      // masked load reads only the row's own elements (an odd k's last pair
      // has one) and zeros the rest, ranks past r included.
      for (int64_t qb = q0; qb < q1; qb += 16) {
        const int64_t nq = min64(16, q1 - qb);
        const int64_t elems = min64(2 * nq, k - 2 * qb);
        const __mmask32 mask = _cvtu32_mask32(static_cast<uint32_t>((uint64_t{1} << elems) - 1));
        __m512i block[16];
        for (int c = 0; c < 16; ++c) {
          block[c] = j0 + c < r ? _mm512_maskz_loadu_epi16(mask, A + (j0 + c) * k + 2 * qb)
                                : _mm512_setzero_si512();
        }
        transpose16(block);
        for (int64_t q = 0; q < nq; ++q) {
          _mm512_storeu_si512(P + (qb + q) * width + 16 * v, block[q]);
        }
      }
    }
  }
}

void shrink_packed(
    const uint16_t* x, int64_t ldx, const uint32_t* packed, int64_t k, int64_t r,
    int64_t rows, float* t, int64_t ldt) {
  const int64_t pairs = (k + 1) / 2;
  for (int64_t g = 0; g * kShrinkGroupRanks < r; ++g) {
    const int64_t j0 = g * kShrinkGroupRanks;
    const int64_t vectors = group_vectors(g, r);
    const int64_t tail = (r - j0) - 16 * (vectors - 1);
    const __mmask16 last = _cvtu32_mask16(tail >= 16 ? 0xFFFFu : (1u << tail) - 1);
    const int max_rows = kBroadcastRows[vectors - 1];
    const uint32_t* P = packed + packed_group_offset(g, pairs);
    for (int64_t i = 0; i < rows; i += max_rows) {
      const int64_t mr = min64(max_rows, rows - i);
      kBroadcastTiles[vectors - 1][mr - 1](x + i * ldx, ldx, P, 16 * vectors, k, t + i * ldt + j0,
                                           ldt, last);
    }
  }
}

namespace {

// The panel of outputs [o, o + 32) in B as pack_expand_weights lays it out.
template <typename Word>
Word* packed_panel(Word* packed, int64_t o, int64_t pairs) {
  return packed + o / kPanelCols * pairs * kPanelCols;
}

} // namespace

bool split_rounded(
    const float* acc, int64_t n, float scale, const float* bias, uint16_t* hi, uint16_t* lo) {
  const __m512 s = _mm512_set1_ps(scale);
  constexpr int kInf = 0x08 | 0x10;
  constexpr int kNotFinite = 0x01 | kInf | 0x80;  // quiet NaN, ±inf, signalling NaN
  __mmask16 overflowed = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 c = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, acc + i));
    if (bias != nullptr) {
      c = _mm512_add_ps(_mm512_maskz_loadu_ps(m, bias + i), c);
    }
    const __m256i h = round_to_bf16(c);
    const __m512 hw = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    __m512 l = _mm512_sub_ps(c, hw);
    l = _mm512_maskz_mov_ps(static_cast<__mmask16>(~_mm512_fpclass_ps_mask(l, kNotFinite)), l);
    overflowed |= _mm512_fpclass_ps_mask(hw, kInf) & ~_mm512_fpclass_ps_mask(c, kNotFinite);
    _mm256_mask_storeu_epi16(hi + i, m, h);
    _mm256_mask_storeu_epi16(lo + i, m, round_to_bf16(l));
  }
  return overflowed != 0;
}

void pack_expand_weights(
    const uint16_t* B, int64_t r, int64_t d, int64_t o0, int64_t o1, uint32_t* packed) {
  const int64_t pairs = (r + 1) / 2;
  for (int64_t o = o0; o < o1; o += kPanelCols) {
    pack_pairs(B, r, o, min64(kPanelCols, d - o), packed_panel(packed, o, pairs));
  }
}

void expand(
    const float* t, int64_t ldt, int64_t rows, const uint16_t* B, int64_t r,
    const uint16_t* bias, int64_t o0, int64_t o1, uint16_t* y, int64_t ldy,
    uint32_t* scratch, const uint32_t* packed) {
  const int64_t pairs = (r + 1) / 2;
  uint32_t* tb = scratch;
  uint32_t* panel = scratch + rows * pairs;
  round_intermediate(t, ldt, rows, r, tb);
  for (int64_t o = o0; o < o1; o += kPanelCols) {
    const int64_t nc = min64(kPanelCols, o1 - o);
    const uint32_t* P = panel;
    if (packed != nullptr) {
      P = packed_panel(packed, o, pairs);
    } else {
      pack_pairs(B, r, o, nc, panel);
    }
    const __mmask16 m0 = _cvtu32_mask16(nc >= 16 ? 0xFFFFu : (1u << nc) - 1);
    const __mmask16 m1 = _cvtu32_mask16(nc >= 32 ? 0xFFFFu : nc > 16 ? (1u << (nc - 16)) - 1 : 0);
    const __m512 bias0 = bias != nullptr ? load16_widened(bias + o, m0) : _mm512_setzero_ps();
    const __m512 bias1 = bias != nullptr ? load16_widened(bias + o + 16, m1) : _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; i += kExpandRows) {
      const int64_t mr = min64(kExpandRows, rows - i);
      kExpandTiles[mr - 1](tb + i * pairs, pairs, P, bias0, bias1, m0, m1, y + i * ldy + o,
                           ldy);
    }
  }
}

} // namespace avx512bf16
} // namespace lowrank_ext

#endif // LOWRANK_EXT_X86_KERNELS
