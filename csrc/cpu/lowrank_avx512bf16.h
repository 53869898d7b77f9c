// AVX512-BF16 micro-kernels for bfloat16 lowrank_linear on the CPU.
//
// vdpbf16ps multiplies pairs of bfloat16 values exactly and adds both
// products to a float32 lane: twice the work of a float32 FMA per
// instruction, with the same float32 accumulation. (Like every AVX512-BF16
// instruction, it treats subnormal inputs, the accumulator included, as zero
// and flushes subnormal results to zero.)
//
// The shrink t = x·Aᵀ runs on it with no change in precision. The expand
// needs t in bfloat16 for that: it rounds the float32 intermediate to
// bfloat16 first, exactly what torch's own composition of two bfloat16
// matmuls does, and halves the expand's time. Outputs round to nearest even
// like c10::BFloat16.
//
// No torch types here, for the reason given in lowrank_avx2.h. Callers must
// check cpu_has_avx512bf16() first.
#pragma once

#include <cstdint>

namespace lowrank_ext {
namespace avx512bf16 {

// True when this CPU and OS run AVX512F, AVX512BW, AVX512DQ, AVX512VL and
// AVX512-BF16 (checked once).
bool cpu_has_avx512bf16();

// t[i, j] = Σ_p x[i, p] · A[j, p] for rows i in [0, rows) and ranks j in
// [j0, j1), x and A bfloat16 bit patterns: the contract of avx2::shrink.
// x rows are ldx elements apart (0 for a broadcast row), A is (r × k)
// contiguous, t is float32 with rows ldt apart.
void shrink(
    const uint16_t* x, int64_t ldx, const uint16_t* A, int64_t k, int64_t rows,
    int64_t j0, int64_t j1, float* t, int64_t ldt);

// Ranks per group of packed A: four vectors of 16 float32 sums.
constexpr int64_t kShrinkGroupRanks = 64;

// A (r × k) as shrink_packed reads it: for each group of up to 64 ranks and
// each pair of columns q, one word per rank (A[j, 2q], A[j, 2q + 1]), zero
// past k and, within the last group's 16-rank vectors, past r. Writes the
// pairs [q0, q1) of every group into `packed`, which holds
// packed_shrink_words(r, k) words, so that threads can split the pairs.
void pack_shrink_weights(
    const uint16_t* A, int64_t r, int64_t k, int64_t q0, int64_t q1, uint32_t* packed);
inline int64_t packed_shrink_words(int64_t r, int64_t k) {
  return (r + 15) / 16 * 16 * ((k + 1) / 2);
}

// t[i, j] = Σ_p x[i, p] · A[j, p] for rows i in [0, rows) and every rank j,
// with A as pack_shrink_weights left it: a broadcast tile (one pair of a row
// of x against 16 ranks per instruction) that needs no horizontal sums and
// reads A once per tile of rows. x rows are ldx elements apart (0 for a
// broadcast row); t is float32 with rows ldt apart.
void shrink_packed(
    const uint16_t* x, int64_t ldx, const uint32_t* packed, int64_t k, int64_t r,
    int64_t rows, float* t, int64_t ldt);

// y[i, o] = bias[o] + Σ_j bf16(t[i, j]) · B[o, j] for rows i in [0, rows) and
// outputs o in [o0, o1), y and bias (may be null) bfloat16 bit patterns: the
// contract of avx2::expand, with t rounded to bfloat16. B is (d × r)
// contiguous; `scratch` holds expand_scratch_words(rows, r) 32-bit words.
// `packed` is B as pack_expand_weights left it (then o0 must be a multiple of
// 32), or null: each panel of B is then packed into scratch as it is reached.
void expand(
    const float* t, int64_t ldt, int64_t rows, const uint16_t* B, int64_t r,
    const uint16_t* bias, int64_t o0, int64_t o1, uint16_t* y, int64_t ldy,
    uint32_t* scratch, const uint32_t* packed);

// Outputs per panel of B in the expand.
constexpr int64_t kExpandPanelCols = 32;

// B (d × r) as the expand reads it, panel by panel of 32 outputs, written for
// the outputs [o0, o1) (o0 a multiple of 32) into `packed`, which holds
// packed_expand_words(d, r) words. Packing once per call rather than once per
// block of rows saves 7 % of the expand.
void pack_expand_weights(
    const uint16_t* B, int64_t r, int64_t d, int64_t o0, int64_t o1, uint32_t* packed);
inline int64_t packed_expand_words(int64_t d, int64_t r) {
  return (d + kExpandPanelCols - 1) / kExpandPanelCols * kExpandPanelCols * ((r + 1) / 2);
}

// Scratch for expand(): the rounded intermediate as bfloat16 pairs, and one
// panel of B for 32 outputs.
inline int64_t expand_scratch_words(int64_t rows, int64_t r) {
  return (r + 1) / 2 * (rows + kExpandPanelCols);
}

// The contract of avx2::split_rounded for bfloat16 (hi and lo bfloat16 bit
// patterns, rounded as c10::BFloat16 rounds), on 512-bit vectors.
bool split_rounded(
    const float* acc, int64_t n, float scale, const float* bias, uint16_t* hi, uint16_t* lo);
} // namespace avx512bf16
} // namespace lowrank_ext
