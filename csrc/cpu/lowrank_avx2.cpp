// AVX2/FMA micro-kernels of lowrank_linear (see lowrank_avx2.h).
//
// Both products contract over a dimension that is contiguous in both
// operands (t = x·Aᵀ over k, y = t·Bᵀ over r), so one register-blocked
// "dot tile" serves both without packing: a tile of 3 rows of the left
// operand by 4 rows of the right one keeps 12 float32 accumulators (8 lanes
// each), loads 7 vectors per 12 FMAs, and folds the 4 accumulators of a row
// into 4 adjacent outputs with a short hadd tree. Packing B for a broadcast
// kernel would cost a pass over B per row block, as much as the product
// itself at small M.
//
// Half types are widened in registers (bf16: a 16-bit shift; fp16: F16C) and
// accumulated in float32.
//
// Only <immintrin.h> and standard headers are included: the whole file is
// compiled for AVX2, and no function here may be reached without the runtime
// check in cpu_has_avx2_fma(). Built on x86 only (x86_kernels.h).
#include "x86_kernels.h"
#if LOWRANK_EXT_X86_KERNELS
#pragma GCC target("avx2,fma,f16c")

#include "lowrank_avx2.h"

#include <immintrin.h>

#include <cstring>

namespace lowrank_ext {
namespace avx2 {
namespace {

// 16-bit storage types, layout-compatible with c10::BFloat16 / c10::Half.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// Local helper: std::min compiled here would be an AVX2 copy of a symbol that
// portable code shares.
inline int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Rows of the left operand and of the right operand per tile.
constexpr int kMR = 3;
constexpr int kNR = 4;
// Contraction chunk of the shrink: 3 rows of x (12 KB in float32) stay in L1
// and a chunk of A rows (r × 1024) in L2 while a row block is processed.
constexpr int64_t kKChunk = 1024;
// Outputs per expand chunk: 64 rows of B (r ≤ 128: ≤ 32 KB) stay in L1 while
// every row of the block is expanded against them.
constexpr int64_t kOChunk = 64;
// Rows from which the expand packs B into panels (see expand_panels).
constexpr int64_t kPanelMinRows = 8;

inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const f16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float to_float(float v) {
  return v;
}
inline float to_float(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(f16 v) {
  return _cvtsh_ss(v.bits);
}

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
// Round to nearest even with NaN kept quiet, exactly as c10::BFloat16 does.
template <>
inline bf16 from_float<bf16>(float v) {
  if (v != v) {
    return bf16{0x7FC0};
  }
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u += 0x7FFF + ((u >> 16) & 1);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
template <>
inline f16 from_float<f16>(float v) {
  return f16{_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)};
}

// Stores 4 floats as T (the full-width tile of the expand).
inline void store4(float* p, __m128 v) {
  _mm_storeu_ps(p, v);
}
inline void store4(bf16* p, __m128 v) {
  __m128i u = _mm_castps_si128(v);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
  u = _mm_add_epi32(u, _mm_add_epi32(lsb, _mm_set1_epi32(0x7FFF)));
  u = _mm_srli_epi32(u, 16);
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
  u = _mm_blendv_epi8(u, _mm_set1_epi32(0x7FC0), nan);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(u, u));
}
inline void store4(f16* p, __m128 v) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Lane j of the result is the horizontal sum of accumulator j.
inline __m128 fold4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// sums[i][j] = Σ_p X[i, p] · W[j, p] over p in [0, K), for an MR × NR tile.
template <int MR, int NR, typename TX, typename TW>
inline void dot_tile(
    const TX* X, int64_t ldx, const TW* W, int64_t ldw, int64_t K, float sums[MR][4]) {
  __m256 acc[MR][4];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      acc[i][j] = _mm256_setzero_ps();
    }
  }
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t p = 0; p < K8; p += 8) {
    __m256 xv[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      xv[i] = load8(X + i * ldx + p);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const __m256 w = load8(W + j * ldw + p);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        acc[i][j] = _mm256_fmadd_ps(xv[i], w, acc[i][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    _mm_storeu_ps(sums[i], fold4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
  }
  for (int i = 0; i < MR; ++i) {
    for (int64_t p = K8; p < K; ++p) {
      const float xi = to_float(X[i * ldx + p]);
      for (int j = 0; j < NR; ++j) {
        sums[i][j] += xi * to_float(W[j * ldw + p]);
      }
    }
  }
}

// t[i, j] (+)= Σ_p x[i, p] · A[j, p] over one chunk of p.
template <int MR, int NR, typename T>
void shrink_tile(
    const T* x, int64_t ldx, const T* A, int64_t lda, int64_t kc, float* t,
    int64_t ldt, bool accumulate) {
  float sums[MR][4];
  dot_tile<MR, NR>(x, ldx, A, lda, kc, sums);
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      t[i * ldt + j] = accumulate ? t[i * ldt + j] + sums[i][j] : sums[i][j];
    }
  }
}

// y[i, o] = bias[o] + Σ_j t[i, j] · B[o, j].
template <int MR, int NR, typename T>
void expand_tile(
    const float* t, int64_t ldt, const T* B, int64_t r, const T* bias, T* y,
    int64_t ldy) {
  float sums[MR][4];
  dot_tile<MR, NR>(t, ldt, B, r, r, sums);
  if (NR == 4) {
    const __m128 b = bias != nullptr
        ? _mm_setr_ps(to_float(bias[0]), to_float(bias[1]), to_float(bias[2]), to_float(bias[3]))
        : _mm_setzero_ps();
    for (int i = 0; i < MR; ++i) {
      store4(y + i * ldy, _mm_add_ps(_mm_loadu_ps(sums[i]), b));
    }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const float b = bias != nullptr ? to_float(bias[j]) : 0.0f;
      y[i * ldy + j] = from_float<T>(sums[i][j] + b);
    }
  }
}

// Tile functions indexed by [rows - 1][cols - 1], for the edges of a block.
template <typename T>
struct Tiles {
  using Shrink = void (*)(const T*, int64_t, const T*, int64_t, int64_t, float*, int64_t, bool);
  using Expand = void (*)(const float*, int64_t, const T*, int64_t, const T*, T*, int64_t);
  static constexpr Shrink shrink[kMR][kNR] = {
      {shrink_tile<1, 1, T>, shrink_tile<1, 2, T>, shrink_tile<1, 3, T>, shrink_tile<1, 4, T>},
      {shrink_tile<2, 1, T>, shrink_tile<2, 2, T>, shrink_tile<2, 3, T>, shrink_tile<2, 4, T>},
      {shrink_tile<3, 1, T>, shrink_tile<3, 2, T>, shrink_tile<3, 3, T>, shrink_tile<3, 4, T>}};
  static constexpr Expand expand[kMR][kNR] = {
      {expand_tile<1, 1, T>, expand_tile<1, 2, T>, expand_tile<1, 3, T>, expand_tile<1, 4, T>},
      {expand_tile<2, 1, T>, expand_tile<2, 2, T>, expand_tile<2, 3, T>, expand_tile<2, 4, T>},
      {expand_tile<3, 1, T>, expand_tile<3, 2, T>, expand_tile<3, 3, T>, expand_tile<3, 4, T>}};
};

template <typename T>
void shrink_typed(
    const T* x, int64_t ldx, const T* A, int64_t k, int64_t rows, int64_t j0,
    int64_t j1, float* t, int64_t ldt) {
  for (int64_t p0 = 0; p0 < k; p0 += kKChunk) {
    const int64_t kc = min64(kKChunk, k - p0);
    for (int64_t i = 0; i < rows; i += kMR) {
      const int64_t mr = min64(kMR, rows - i);
      for (int64_t j = j0; j < j1; j += kNR) {
        const int64_t nr = min64(kNR, j1 - j);
        Tiles<T>::shrink[mr - 1][nr - 1](
            x + i * ldx + p0, ldx, A + j * k + p0, k, kc, t + i * ldt + j, ldt, p0 > 0);
      }
    }
  }
}

template <typename T>
void expand_typed(
    const float* t, int64_t ldt, int64_t rows, const T* B, int64_t r, const T* bias,
    int64_t o0, int64_t o1, T* y, int64_t ldy) {
  for (int64_t c0 = o0; c0 < o1; c0 += kOChunk) {
    const int64_t c1 = min64(o1, c0 + kOChunk);
    for (int64_t i = 0; i < rows; i += kMR) {
      const int64_t mr = min64(kMR, rows - i);
      for (int64_t o = c0; o < c1; o += kNR) {
        const int64_t nr = min64(kNR, c1 - o);
        Tiles<T>::expand[mr - 1][nr - 1](
            t + i * ldt, ldt, B + o * r, r, bias != nullptr ? bias + o : nullptr,
            y + i * ldy + o, ldy);
      }
    }
  }
}


// ---------------------------------------------------------------- panel expand
//
// With enough rows, the expand runs as a broadcast kernel instead: B is packed
// 16 outputs at a time into a float32 panel P[j][0..16) = B[o..o+16, j], and a
// tile of 6 rows × 16 outputs keeps 12 accumulators that need no horizontal
// sums; each output row is stored as two full vectors. Packing a panel costs
// 16·r element moves, repaid over every row of the block.

constexpr int kPanelRows = 6;
constexpr int kPanelCols = 16;

inline void store8(float* p, __m256 v) {
  _mm256_storeu_ps(p, v);
}
template <typename T>
inline void store8(T* p, __m256 v) {
  store4(p, _mm256_castps256_ps128(v));
  store4(p + 4, _mm256_extractf128_ps(v, 1));
}

// 8×8 transpose in registers.
inline void transpose8(__m256 v[8]) {
  __m256 t[8], s[8];
  for (int q = 0; q < 4; ++q) {
    t[2 * q] = _mm256_unpacklo_ps(v[2 * q], v[2 * q + 1]);
    t[2 * q + 1] = _mm256_unpackhi_ps(v[2 * q], v[2 * q + 1]);
  }
  for (int q = 0; q < 2; ++q) {
    s[4 * q + 0] = _mm256_shuffle_ps(t[4 * q + 0], t[4 * q + 2], 0x44);
    s[4 * q + 1] = _mm256_shuffle_ps(t[4 * q + 0], t[4 * q + 2], 0xEE);
    s[4 * q + 2] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
    s[4 * q + 3] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    v[q] = _mm256_permute2f128_ps(s[q], s[q + 4], 0x20);
    v[q + 4] = _mm256_permute2f128_ps(s[q], s[q + 4], 0x31);
  }
}

// P[j][c] = M[o + c, j] for c < nc (zero beyond), j < count, where the rows of
// M are ld elements apart: a panel of B (ld = count = r) or of a chunk of A.
template <typename T>
void pack_panel(const T* M, int64_t ld, int64_t count, int64_t o, int64_t nc, float* P) {
  const int64_t c8 = nc == kPanelCols ? (count & ~int64_t{7}) : 0;
  for (int64_t j0 = 0; j0 < c8; j0 += 8) {
    for (int half = 0; half < 2; ++half) {
      __m256 v[8];
      for (int c = 0; c < 8; ++c) {
        v[c] = load8(M + (o + half * 8 + c) * ld + j0);
      }
      transpose8(v);
      for (int jj = 0; jj < 8; ++jj) {
        _mm256_storeu_ps(P + (j0 + jj) * kPanelCols + half * 8, v[jj]);
      }
    }
  }
  for (int64_t j = c8; j < count; ++j) {
    for (int64_t c = 0; c < kPanelCols; ++c) {
      P[j * kPanelCols + c] = c < nc ? to_float(M[(o + c) * ld + j]) : 0.0f;
    }
  }
}

// c0/c1[i] += Σ_j a[i, j] · P[j][0..16) over j < n: the 6 × 16 broadcast tile
// of the panel expand (a = t), of the packed shrink (a = x) and of the weight
// gradient. a[i, j] is a[i * lda + j], or a[i * lda + j * ldj] when kStrided
// (a transposed view read in place). Always inlined, so that the
// accumulators stay in registers.
template <int MR, bool kStrided = false>
__attribute__((always_inline)) inline void broadcast_tile(
    const float* a, int64_t lda, const float* P, int64_t n, __m256 (&c0)[MR],
    __m256 (&c1)[MR], int64_t ldj = 1) {
  for (int64_t j = 0; j < n; ++j) {
    const __m256 p0 = _mm256_loadu_ps(P + j * kPanelCols);
    const __m256 p1 = _mm256_loadu_ps(P + j * kPanelCols + 8);
    const float* aj = a + (kStrided ? j * ldj : j);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 v = _mm256_broadcast_ss(aj + i * lda);
      c0[i] = _mm256_fmadd_ps(v, p0, c0[i]);
      c1[i] = _mm256_fmadd_ps(v, p1, c1[i]);
    }
  }
}

// The accumulators of a tile whose last panel is partial, to memory, so that
// only its first nc columns are written out.
template <int MR>
__attribute__((always_inline)) inline void spill_tile(
    const __m256 (&c0)[MR], const __m256 (&c1)[MR], float (&out)[MR][kPanelCols]) {
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(out[i], c0[i]);
    _mm256_storeu_ps(out[i] + 8, c1[i]);
  }
}

template <int MR, typename T>
void panel_tile(
    const float* t, int64_t ldt, const float* P, int64_t r, const float* bias16, T* y,
    int64_t ldy, int64_t nc) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    c0[i] = _mm256_setzero_ps();
    c1[i] = _mm256_setzero_ps();
  }
  broadcast_tile<MR>(t, ldt, P, r, c0, c1);
  // The bias last, as every other path (and F.linear) adds it: started from
  // the bias, a sum near float32's range overflowed on this path alone, so
  // the same row's output depended on the batch's row count.
  const __m256 b0 = _mm256_loadu_ps(bias16);
  const __m256 b1 = _mm256_loadu_ps(bias16 + 8);
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    c0[i] = _mm256_add_ps(c0[i], b0);
    c1[i] = _mm256_add_ps(c1[i], b1);
  }
  // Every loop over the accumulators is unrolled so that they stay in registers.
  if (nc == kPanelCols) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      store8(y + i * ldy, c0[i]);
      store8(y + i * ldy + 8, c1[i]);
    }
    return;
  }
  float out[MR][kPanelCols];
  spill_tile<MR>(c0, c1, out);
  for (int i = 0; i < MR; ++i) {
    for (int64_t c = 0; c < nc; ++c) {
      y[i * ldy + c] = from_float<T>(out[i][c]);
    }
  }
}

// B is packed a group of panels at a time (expand_group_panels: 64 KB of
// panels, which stay in L2), and each strip of 6 rows runs across the whole
// group before the next strip. Packing one panel and running it down every
// row of the block, the earlier order, wrote y a 64-byte column at a time
// with rows 16 KB apart at d = 4096: a page per row, TLB misses and no
// streaming of the stores (65 against 86 GFLOP/s on one Zen 3 core at
// 2048 × 64 × 4096).
template <typename T>
void expand_panels(
    const float* t, int64_t ldt, int64_t rows, const T* B, int64_t r, const T* bias,
    int64_t o0, int64_t o1, T* y, int64_t ldy, float* P) {
  using Tile = void (*)(const float*, int64_t, const float*, int64_t, const float*, T*,
                        int64_t, int64_t);
  static constexpr Tile tiles[kPanelRows] = {panel_tile<1, T>, panel_tile<2, T>,
                                             panel_tile<3, T>, panel_tile<4, T>,
                                             panel_tile<5, T>, panel_tile<6, T>};
  const int64_t group_cols = expand_group_panels(r) * kPanelCols;
  float bias16[kExpandGroupMaxPanels][kPanelCols];
  for (int64_t g0 = o0; g0 < o1; g0 += group_cols) {
    const int64_t g1 = min64(o1, g0 + group_cols);
    const int64_t panels = (g1 - g0 + kPanelCols - 1) / kPanelCols;
    for (int64_t q = 0; q < panels; ++q) {
      const int64_t o = g0 + q * kPanelCols;
      const int64_t nc = min64(kPanelCols, g1 - o);
      pack_panel(B, r, r, o, nc, P + q * kPanelCols * r);
      for (int64_t c = 0; c < kPanelCols; ++c) {
        bias16[q][c] = bias != nullptr && c < nc ? to_float(bias[o + c]) : 0.0f;
      }
    }
    for (int64_t i = 0; i < rows; i += kPanelRows) {
      const int64_t mr = min64(kPanelRows, rows - i);
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t o = g0 + q * kPanelCols;
        tiles[mr - 1](t + i * ldt, ldt, P + q * kPanelCols * r, r, bias16[q],
                      y + i * ldy + o, ldy, min64(kPanelCols, g1 - o));
      }
    }
  }
}


// ---------------------------------------------------------------- packed shrink
//
// With many float32 rows, the shrink runs as a broadcast kernel too: a chunk
// of kPackK columns of A is packed into panels of 16 ranks, P[p][0..16) =
// A[j..j+16, p0 + p], and a tile of 6 rows × 16 ranks keeps 12 accumulators.
// Per 12 FMAs it loads two panel vectors from L1 and broadcasts 6 elements of
// x, where the dot tile streams 4 vectors of A from L2, which bounds it at
// L2 bandwidth. Packing costs r·kPackK moves per chunk, repaid over the
// block's rows.

constexpr int64_t kPackK = 256;
// Rows whose x chunk (192 × 256 floats) stays in L2 while every panel passes.
constexpr int64_t kPackRowBlock = 192;

template <int MR, bool kStrided = false>
void shrink_panel_tile(
    const float* x, int64_t ldx, const float* P, int64_t kc, float* t, int64_t ldt,
    int64_t nc, bool accumulate, int64_t ldj) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    c0[i] = _mm256_setzero_ps();
    c1[i] = _mm256_setzero_ps();
  }
  broadcast_tile<MR, kStrided>(x, ldx, P, kc, c0, c1, ldj);
  if (nc == kPanelCols) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      float* ti = t + i * ldt;
      if (accumulate) {
        c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(ti));
        c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(ti + 8));
      }
      _mm256_storeu_ps(ti, c0[i]);
      _mm256_storeu_ps(ti + 8, c1[i]);
    }
    return;
  }
  float out[MR][kPanelCols];
  spill_tile<MR>(c0, c1, out);
  for (int i = 0; i < MR; ++i) {
    for (int64_t c = 0; c < nc; ++c) {
      t[i * ldt + c] = accumulate ? t[i * ldt + c] + out[i][c] : out[i][c];
    }
  }
}

// Panel tiles by [rows - 1], for the packed shrink and the weight gradient:
// the left operand's rows contiguous, or (strided) read along a column stride.
using PanelTile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t,
                           int64_t, bool, int64_t);
constexpr PanelTile kPanelTiles[kPanelRows] = {shrink_panel_tile<1>, shrink_panel_tile<2>,
                                               shrink_panel_tile<3>, shrink_panel_tile<4>,
                                               shrink_panel_tile<5>, shrink_panel_tile<6>};
constexpr PanelTile kStridedPanelTiles[kPanelRows] = {
    shrink_panel_tile<1, true>, shrink_panel_tile<2, true>, shrink_panel_tile<3, true>,
    shrink_panel_tile<4, true>, shrink_panel_tile<5, true>, shrink_panel_tile<6, true>};

// G[i, c] = Σ_j L[i, j] · b[j, c] for rows i < m and columns c in [c0, c1),
// where L[i, j] is at L + i·ldl + j·ldj: the product behind the weight
// gradient and the panel form of rows_times_weight. b is taken `chunk` rows
// by `block` columns at a time. Each such block is read row by row, along b's
// rows (so from memory once and in order), into float32 panels of 16
// columns, [panel][row][16], the last one zero-padded; then the 6 × 16 tiles
// run over every panel in turn under one strip of L (6 × chunk, in L1), and G
// accumulates chunk by chunk. Packing one 16-column panel at a time down b's
// rows, the first form, read one 64-byte line per row, 16 KB apart at
// n = 4096: latency-bound (84–131 GFLOP/s on 2 cores for the weight
// gradient, 140–155 in this form). chunk × block is at most
// kPanelScratchFloats.
constexpr int64_t kPanelScratchFloats = 32768;

template <typename T>
void packed_panel_product(
    const float* L, int64_t ldl, int64_t ldj, int64_t m, int64_t len, const T* b, int64_t ldb,
    int64_t c0, int64_t c1, float* G, int64_t ldg, int64_t chunk, int64_t block) {
  // 128 KB per thread, reused by every call on that thread (and shared by
  // both users of this routine) rather than allocated per call.
  alignas(64) static thread_local float scratch[kPanelScratchFloats];
  const PanelTile* tiles = ldj == 1 ? kPanelTiles : kStridedPanelTiles;
  for (int64_t b0 = c0; b0 < c1; b0 += block) {
    const int64_t width = min64(c1, b0 + block) - b0;
    const int64_t full = width / kPanelCols;                     // whole panels
    const int64_t panels = (width + kPanelCols - 1) / kPanelCols; // and a zero-padded one
    for (int64_t p0 = 0; p0 < len; p0 += chunk) {
      const int64_t kc = min64(chunk, len - p0);
      for (int64_t j = 0; j < kc; ++j) {
        const T* row = b + (p0 + j) * ldb + b0;
        for (int64_t q = 0; q < full; ++q) {
          float* P = scratch + (q * kc + j) * kPanelCols;
          _mm256_storeu_ps(P, load8(row + q * kPanelCols));
          _mm256_storeu_ps(P + 8, load8(row + q * kPanelCols + 8));
        }
        if (full < panels) {
          float* P = scratch + (full * kc + j) * kPanelCols;
          const int64_t start = full * kPanelCols;
          for (int64_t c = 0; c < kPanelCols; ++c) {
            P[c] = start + c < width ? to_float(row[start + c]) : 0.0f;
          }
        }
      }
      for (int64_t i = 0; i < m; i += kPanelRows) {
        const PanelTile tile = tiles[min64(kPanelRows, m - i) - 1];
        for (int64_t q = 0; q < panels; ++q) {
          tile(L + i * ldl + p0 * ldj, ldl, scratch + q * kc * kPanelCols, kc,
               G + i * ldg + b0 + q * kPanelCols, ldg, min64(kPanelCols, width - q * kPanelCols),
               p0 > 0, ldj);
        }
      }
    }
  }
}

// out[i, c] = Σ_o g[i, o] · W[o, c] for c in [c0, c1): g (rows × d) float32,
// W (d × n) contiguous, two ways.
//
// A few rows (below kRtwPanelRows): eight rows of W are in flight at once
// (eight sequential streams); each output vector is loaded and stored once per
// eight rows of W, with eight multiply-adds in between, so the outputs stay in
// L1 for the caller's column chunks.
//
// More rows: packed_panel_product with W taken kRtwDBlock rows by kRtwCols
// columns at a time: per row of W two loads of 8 weights and one broadcast of
// g per row of the tile, each broadcast feeding two multiply-adds (110
// GFLOP/s on one Zen 4 core in isolation; tiles of 12 rows × 8 columns, one
// multiply-add per broadcast, reached 39). The first version used the
// streaming form at every row count and was 2.4× slower than ATen's GEMM at
// 32 rows.
constexpr int kRtwInFlight = 8;
constexpr int64_t kRtwPanelRows = 4;
constexpr int64_t kRtwDBlock = 64;
constexpr int64_t kRtwCols = 512;

template <typename T>
void rows_times_weight_stream(
    const float* g, int64_t ldg, int64_t rows, const T* W, int64_t d, int64_t n,
    int64_t c0, int64_t c1, float* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memset(out + i * ldo + c0, 0, sizeof(float) * (c1 - c0));
  }
  const int64_t vec_end = c0 + (c1 - c0) / 8 * 8;
  for (int64_t o0 = 0; o0 < d; o0 += kRtwInFlight) {
    const int64_t nr = min64(kRtwInFlight, d - o0);
    for (int64_t c = c0; c < vec_end; c += 8) {
      __m256 w[kRtwInFlight];
#pragma GCC unroll 8
      for (int j = 0; j < kRtwInFlight; ++j) {
        w[j] = j < nr ? load8(W + (o0 + j) * n + c) : _mm256_setzero_ps();
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float* gi = g + i * ldg + o0;
        __m256 acc = _mm256_loadu_ps(out + i * ldo + c);
#pragma GCC unroll 8
        for (int j = 0; j < kRtwInFlight; ++j) {
          // Rows past d have w = 0; their g is never read.
          acc = _mm256_fmadd_ps(_mm256_set1_ps(j < nr ? gi[j] : 0.0f), w[j], acc);
        }
        _mm256_storeu_ps(out + i * ldo + c, acc);
      }
    }
    for (int64_t c = vec_end; c < c1; ++c) {  // column tail
      for (int64_t i = 0; i < rows; ++i) {
        float sum = out[i * ldo + c];
        for (int64_t j = 0; j < nr; ++j) {
          sum += g[i * ldg + o0 + j] * to_float(W[(o0 + j) * n + c]);
        }
        out[i * ldo + c] = sum;
      }
    }
  }
}

template <typename T>
void rows_times_weight_panels(
    const float* g, int64_t ldg, int64_t rows, const T* W, int64_t d, int64_t n,
    int64_t c0, int64_t c1, float* out, int64_t ldo) {
  static_assert(kRtwDBlock * kRtwCols <= kPanelScratchFloats);
  packed_panel_product(g, ldg, 1, rows, d, W, n, c0, c1, out, ldo, kRtwDBlock, kRtwCols);
}

template <typename T>
void rows_times_weight_typed(
    const float* g, int64_t ldg, int64_t rows, const T* W, int64_t d, int64_t n,
    int64_t c0, int64_t c1, float* out, int64_t ldo) {
  if (rows < kRtwPanelRows || d == 0) {
    rows_times_weight_stream(g, ldg, rows, W, d, n, c0, c1, out, ldo);
  } else {
    rows_times_weight_panels(g, ldg, rows, W, d, n, c0, c1, out, ldo);
  }
}

} // namespace

int64_t packed_shrink_floats(int64_t r) {
  return (r + kPanelCols - 1) / kPanelCols * kPanelCols * kPackK;
}

void shrink_packed(
    const float* x, int64_t ldx, const float* A, int64_t k, int64_t r, int64_t rows,
    float* t, int64_t ldt, float* scratch) {
  const int64_t panels = (r + kPanelCols - 1) / kPanelCols;
  for (int64_t p0 = 0; p0 < k; p0 += kPackK) {
    const int64_t kc = min64(kPackK, k - p0);
    for (int64_t q = 0; q < panels; ++q) {
      pack_panel(A + p0, k, kc, q * kPanelCols, min64(kPanelCols, r - q * kPanelCols),
                 scratch + q * kc * kPanelCols);
    }
    for (int64_t i0 = 0; i0 < rows; i0 += kPackRowBlock) {
      const int64_t i1 = min64(rows, i0 + kPackRowBlock);
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t nc = min64(kPanelCols, r - q * kPanelCols);
        for (int64_t i = i0; i < i1; i += kPanelRows) {
          kPanelTiles[min64(kPanelRows, i1 - i) - 1](x + i * ldx + p0, ldx,
                                                     scratch + q * kc * kPanelCols, kc,
                                                     t + i * ldt + q * kPanelCols, ldt, nc,
                                                     p0 > 0, 1);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- weight gradient
//
// packed_panel_product with b taken kPackK rows by kWeightGradCols columns at
// a time: a transposed gy (gB = gyᵀ·t, L read in place along a stride) is
// then read from memory once too, since its strip stays in L1 across the
// panels.

void weight_grad(
    const float* L, int64_t ldl, int64_t ldj, int64_t m, int64_t len, const float* b,
    int64_t ldb, int64_t c0, int64_t c1, float* G, int64_t ldg) {
  static_assert(kPackK * kWeightGradCols <= kPanelScratchFloats);
  packed_panel_product(L, ldl, ldj, m, len, b, ldb, c0, c1, G, ldg, kPackK, kWeightGradCols);
}

// ---------------------------------------------------------------- split rounding

namespace {

// 8 float32 lanes rounded to T's bit patterns (as store4 rounds), and back.
inline __m128i round8(bf16, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  u = _mm256_blendv_epi8(u, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}
inline __m128i round8(f16, __m256 v) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
}
inline __m256 widen8(bf16, __m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 widen8(f16, __m128i h) {
  return _mm256_cvtph_ps(h);
}

template <typename T>
bool split_rounded_typed(
    const float* acc, int64_t n, float scale, const float* bias, T* hi, T* lo) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  __m256 overflowed = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 c = _mm256_mul_ps(s, _mm256_loadu_ps(acc + i));
    if (bias != nullptr) {
      c = _mm256_add_ps(_mm256_loadu_ps(bias + i), c);
    }
    const __m128i h = round8(T{}, c);
    const __m256 hw = widen8(T{}, h);
    __m256 l = _mm256_sub_ps(c, hw);
    // |l| < inf is false for ±inf and NaN.
    l = _mm256_and_ps(l, _mm256_cmp_ps(_mm256_and_ps(l, abs_mask), inf, _CMP_LT_OQ));
    overflowed = _mm256_or_ps(
        overflowed, _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(hw, abs_mask), inf, _CMP_EQ_OQ),
                                  _mm256_cmp_ps(_mm256_and_ps(c, abs_mask), inf, _CMP_LT_OQ)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + i), h);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + i), round8(T{}, l));
  }
  bool any = _mm256_movemask_ps(overflowed) != 0;
  for (; i < n; ++i) {
    const float c = (bias != nullptr ? bias[i] : 0.0f) + scale * acc[i];
    hi[i] = from_float<T>(c);
    const float h = to_float(hi[i]);
    const float l = c - h;
    lo[i] = from_float<T>(l - l == 0.0f ? l : 0.0f);
    any |= (h - h != 0.0f) && (c - c == 0.0f);
  }
  return any;
}

} // namespace

bool split_rounded(
    ElemType type, const float* acc, int64_t n, float scale, const float* bias, void* hi,
    void* lo) {
  switch (type) {
    case ElemType::kBFloat16:
      return split_rounded_typed(acc, n, scale, bias, static_cast<bf16*>(hi), static_cast<bf16*>(lo));
    case ElemType::kFloat16:
      return split_rounded_typed(acc, n, scale, bias, static_cast<f16*>(hi), static_cast<f16*>(lo));
    case ElemType::kFloat32:
      break; // nothing to split: callers pass 16-bit types only
  }
  return false;
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
  }();
  return has;
}

void shrink(
    ElemType type, const void* x, int64_t ldx, const void* A, int64_t k,
    int64_t rows, int64_t j0, int64_t j1, float* t, int64_t ldt) {
  switch (type) {
    case ElemType::kFloat32:
      return shrink_typed(static_cast<const float*>(x), ldx, static_cast<const float*>(A), k,
                          rows, j0, j1, t, ldt);
    case ElemType::kBFloat16:
      return shrink_typed(static_cast<const bf16*>(x), ldx, static_cast<const bf16*>(A), k,
                          rows, j0, j1, t, ldt);
    case ElemType::kFloat16:
      return shrink_typed(static_cast<const f16*>(x), ldx, static_cast<const f16*>(A), k,
                          rows, j0, j1, t, ldt);
  }
}

void expand(
    ElemType type, const float* t, int64_t ldt, int64_t rows, const void* B,
    int64_t r, const void* bias, int64_t o0, int64_t o1, void* y, int64_t ldy,
    float* panel) {
  // Few rows cannot repay packing B: dot tiles read B in place.
  const bool panels = panel != nullptr && rows >= kPanelMinRows;
  switch (type) {
    case ElemType::kFloat32: {
      auto* Bt = static_cast<const float*>(B);
      auto* bt = static_cast<const float*>(bias);
      auto* yt = static_cast<float*>(y);
      return panels ? expand_panels(t, ldt, rows, Bt, r, bt, o0, o1, yt, ldy, panel)
                    : expand_typed(t, ldt, rows, Bt, r, bt, o0, o1, yt, ldy);
    }
    case ElemType::kBFloat16: {
      auto* Bt = static_cast<const bf16*>(B);
      auto* bt = static_cast<const bf16*>(bias);
      auto* yt = static_cast<bf16*>(y);
      return panels ? expand_panels(t, ldt, rows, Bt, r, bt, o0, o1, yt, ldy, panel)
                    : expand_typed(t, ldt, rows, Bt, r, bt, o0, o1, yt, ldy);
    }
    case ElemType::kFloat16: {
      auto* Bt = static_cast<const f16*>(B);
      auto* bt = static_cast<const f16*>(bias);
      auto* yt = static_cast<f16*>(y);
      return panels ? expand_panels(t, ldt, rows, Bt, r, bt, o0, o1, yt, ldy, panel)
                    : expand_typed(t, ldt, rows, Bt, r, bt, o0, o1, yt, ldy);
    }
  }
}

void rows_times_weight(
    ElemType type, const float* g, int64_t ldg, int64_t rows, const void* W, int64_t d,
    int64_t n, int64_t c0, int64_t c1, float* out, int64_t ldo) {
  switch (type) {
    case ElemType::kFloat32:
      return rows_times_weight_typed(g, ldg, rows, static_cast<const float*>(W), d, n, c0, c1,
                                     out, ldo);
    case ElemType::kBFloat16:
      return rows_times_weight_typed(g, ldg, rows, static_cast<const bf16*>(W), d, n, c0, c1,
                                     out, ldo);
    case ElemType::kFloat16:
      return rows_times_weight_typed(g, ldg, rows, static_cast<const f16*>(W), d, n, c0, c1,
                                     out, ldo);
  }
}

} // namespace avx2
} // namespace lowrank_ext

#endif // LOWRANK_EXT_X86_KERNELS
