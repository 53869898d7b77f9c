// Where ATen's half-precision matrix products are slow on the CPU.
//
// ATen has a fast float16 GEMM on the CPU only with AVX512-FP16 (or AMX), and
// a fast bfloat16 one (oneDNN) only with AVX512-BF16 dot products; elsewhere
// they are a scalar-speed fallback: a 256 × 4096 × 64 float16 product runs at
// 3.4 GFLOP/s on 2 Zen 4 cores, and a bfloat16 one at 3.3 when oneDNN is
// held to AVX2, against 142 in float32. The half-precision products around
// the fused kernel (the backward's, lora_linear's dense x·Wᵀ) therefore run
// on float32 copies of their operands there and round once.
//
// LOWRANK_EXT_WIDEN_HALF=1 widens on every CPU, =0 never (read at each call,
// for tests and measurements); unset, the CPU decides.
#pragma once

#include <ATen/core/Tensor.h>

namespace lowrank_ext {

// True for a float16 or bfloat16 CPU tensor whose GEMM is slow on this CPU.
bool half_gemm_is_slow(const at::Tensor& like);

// Rows from which a product with a dense (d × k) weight repays the weight's
// float32 copy: measured at d = k = 4096 in float16, 32 rows took 25 ms in
// float16 and 32 widened, 64 rows 45 and 37, 128 rows 92 and 48 (at
// d = k = 1024 the widened product was ahead from 32 rows).
constexpr int64_t kWidenDenseMinRows = 64;

} // namespace lowrank_ext
