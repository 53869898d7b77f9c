// AVX2/FMA micro-kernels for the two products of lowrank_linear on the CPU.
//
// This header carries no torch types so that the implementation file can be
// compiled for AVX2 without also compiling torch's inline functions for AVX2
// (the linker could otherwise pick those copies for the portable code).
// Callers must check cpu_has_avx2_fma() first.
#pragma once

#include <cstdint>

namespace lowrank_ext {
namespace avx2 {

// Element type of x, A, B, bias and y. Half types are 16-bit patterns that are
// widened to float32 in registers; every product accumulates in float32.
enum class ElemType { kFloat32, kBFloat16, kFloat16 };

// True when this CPU runs AVX2, FMA and F16C (checked once).
bool cpu_has_avx2_fma();

// Shrink: t[i, j] = Σ_p x[i, p] · A[j, p] for rows i in [0, rows) and ranks j
// in [j0, j1). x rows are ldx elements apart (0 for a broadcast row), A is
// (r × k) contiguous, t is float32 with rows ldt apart.
void shrink(
    ElemType type, const void* x, int64_t ldx, const void* A, int64_t k,
    int64_t rows, int64_t j0, int64_t j1, float* t, int64_t ldt);

// The same shrink for float32 with A packed into panels of 16 ranks, chunk by
// chunk of k: faster once a block has enough rows to repay the packing (see
// lowrank_avx2.cpp). `scratch` holds packed_shrink_floats(r) floats.
void shrink_packed(
    const float* x, int64_t ldx, const float* A, int64_t k, int64_t r, int64_t rows,
    float* t, int64_t ldt, float* scratch);
int64_t packed_shrink_floats(int64_t r);

// Expand: y[i, o] = bias[o] + Σ_j t[i, j] · B[o, j] for rows i in [0, rows)
// and outputs o in [o0, o1). B is (d × r) contiguous, bias may be null, y has
// rows ldy elements apart. `panel` is scratch for expand_panel_floats(r)
// floats (or null: never pack B).
void expand(
    ElemType type, const float* t, int64_t ldt, int64_t rows, const void* B,
    int64_t r, const void* bias, int64_t o0, int64_t o1, void* y, int64_t ldy,
    float* panel);

// Weight gradient G[i, c] = Σ_j L[i, j] · b[j, c] for rows i < m and columns
// c in [c0, c1), float32: the backward's products, e.g. gA = gtᵀ·x (L = gtᵀ)
// and gB = gyᵀ·t (L = gyᵀ), whose contraction runs over the batch. L[i, j] is
// at L + i·ldl + j·ldj (a transposed view is read in place), b is (len × n)
// with rows ldb apart, G (m × n) with rows ldg apart. The columns are taken
// kWeightGradCols at a time, the natural unit of work to hand a thread.
constexpr int64_t kWeightGradCols = 128;
void weight_grad(
    const float* L, int64_t ldl, int64_t ldj, int64_t m, int64_t len, const float* b,
    int64_t ldb, int64_t c0, int64_t c1, float* G, int64_t ldg);

// out[i, c] = Σ_o g[i, o] · W[o, c] for rows i < rows and columns c in
// [c0, c1), float32 out: few rows times a dense (d × n) weight read in its
// own layout (lora_linear's backward gx = gy·W at a few rows). g is float32
// (rows × d) with rows ldg apart, W is (d × n) contiguous, out has rows ldo
// apart.
void rows_times_weight(
    ElemType type, const float* g, int64_t ldg, int64_t rows, const void* W, int64_t d,
    int64_t n, int64_t c0, int64_t c1, float* out, int64_t ldo);

// c = bias + scale·acc (n float32 values; bias may be null), written as hi,
// c rounded to `type` (bfloat16 or float16 bit patterns, rounded as
// c10::BFloat16 and c10::Half round), and lo, the rounding of c − hi, which is
// exact in float32: hi + lo keeps digits of c that hi alone drops. lo is 0
// where c − hi is not finite (c infinite or NaN, or hi past the type's
// range), so that adding lo to a sum with hi changes nothing there. Returns
// whether hi went past the type's range anywhere c did not (where hi + lo
// is ±inf though the sum it stands in for may not be).
bool split_rounded(
    ElemType type, const float* acc, int64_t n, float scale, const float* bias, void* hi,
    void* lo);
// Panels of 16 outputs of B that expand() packs at once: as many as fill
// kExpandGroupFloats (64 KB, an L2-resident block on every x86 core of
// interest), at least one and at most kExpandGroupMaxPanels.
constexpr int64_t kExpandGroupFloats = 16384;
constexpr int64_t kExpandGroupMaxPanels = 16;
inline int64_t expand_group_panels(int64_t r) {
  const int64_t fit = kExpandGroupFloats / (16 * (r > 0 ? r : 1));
  return fit < 1 ? 1 : fit > kExpandGroupMaxPanels ? kExpandGroupMaxPanels : fit;
}
// Scratch floats expand() needs for one group of packed panels of B.
inline int64_t expand_panel_floats(int64_t r) {
  return 16 * r * expand_group_panels(r);
}

} // namespace avx2
} // namespace lowrank_ext
