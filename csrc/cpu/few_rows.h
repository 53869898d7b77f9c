// A dense product with few rows, x·Wᵀ, on the CPU kernels' shrink.
//
// With few rows x·Wᵀ is a stream over W. The shrink micro-kernels
// (lowrank_avx2, lowrank_avx512bf16), given W's rows a block at a time, read
// W once from memory with the threads splitting its rows, while ATen's GEMM
// (MKL, oneDNN) took up to 2.9× as long in our measurements: at one row of
// 4096 × 4096, 1.9 ms against 3.5 in float32 and 0.9 against 2.3 in bfloat16
// on 2 Zen 4 cores, where reading W alone takes 2.1 ms in float32; float32
// stays ahead up to about 128 rows, bfloat16 up to about 32.
// lora_linear uses it for its dense product at those row counts
// (use_few_rows_dense).
#pragma once

#include <ATen/core/Tensor.h>

namespace lowrank_ext {

// x2 (M × k, unit column stride) times Wᵀ for a contiguous W (n × k), summed
// in float32 and returned in float32 (M × n). Undefined when the AVX2 kernels
// are off on this CPU or the dtype has none (float64).
at::Tensor few_rows_product_cpu(const at::Tensor& x2, const at::Tensor& W);

// True where lora_linear's dense product over `rows` rows runs through
// few_rows_product_cpu rather than ATen's GEMM.
// `x` gives the dtype (and must be a CPU tensor).
bool use_few_rows_dense(const at::Tensor& x, int64_t rows);

// True where lora_linear's backward computes gx = gy·W through the op
// _rows_times_weight, which streams W in its own layout (ops.h).
bool use_few_rows_backward(const at::Tensor& gy, int64_t rows);

} // namespace lowrank_ext
