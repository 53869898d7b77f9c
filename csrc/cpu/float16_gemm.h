// Where ATen's float16 matrix products are slow on the CPU.
//
// Without AVX512-FP16 (or AMX-FP16) ATen has no fast float16 GEMM on the CPU:
// a 256 × 4096 × 64 product runs at 3.4 GFLOP/s on 2 Zen 4 cores, against 142
// in float32 and 344 in bfloat16 (oneDNN). The float16 products around the
// fused kernel (the backward's, lora_linear's dense x·Wᵀ) therefore run on
// float32 copies of their operands there and round once.
#pragma once

#include <ATen/core/Tensor.h>

namespace lowrank_ext {

// True for a float16 CPU tensor on a CPU without AVX512-FP16.
bool float16_gemm_is_slow(const at::Tensor& like);

// Rows from which a product with a dense (d × k) weight repays the weight's
// float32 copy: measured at d = k = 4096, 32 rows took 25 ms in float16 and
// 32 widened, 64 rows 45 and 37, 128 rows 92 and 48 (at d = k = 1024 the
// widened product was ahead from 32 rows).
constexpr int64_t kWidenDenseMinRows = 64;

} // namespace lowrank_ext
