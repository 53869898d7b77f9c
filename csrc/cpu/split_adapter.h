// lora_linear's adapter term for a half-type output on the CPU, in one pass.
//
// lora_linear_half (lora_linear.cpp) hands the half-type GEMM the adapter
// term c = bias + scale·t·Bᵀ, formed in float32, as its C, and adds what
// rounding c to the half type dropped afterwards. Formed with ATen ops, that
// took a float32 buffer of the block's outputs, MKL's expand and four more
// passes (the rounding, the subtraction, nan_to_num, the second rounding).
// Here the expand runs on the AVX2 kernels into a tile that stays in cache
// and is split into the two half-type parts as it is finished. Whole bfloat16
// lora_linear calls at 4096 × 4096, r = 16, 2 Zen 4 cores, time beyond the
// GEMM alone: 0.74–1.33 ms before, 0.38 ms here at 64 rows; 3.0 ms before,
// 1.5–2.3 ms here at 512 rows (peft's composition: 0.5 and 1.6–2.0 ms).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace lowrank_ext {

enum class AdapterSplit {
  kNotRun,     // nothing written: the caller's ATen path handles the call
  kDone,
  kOverflowed, // written, but some c past the half type's range rounded to ±inf
};

// Writes hi = c rounded to hi's dtype and lo = (c − hi) rounded (0 where that
// is not finite), for c = bias + scale·t32·B32ᵀ summed in float32: t32
// (n × r) and B32 (d × r) contiguous float32, bias32 contiguous float32 (d)
// or none, hi and lo contiguous (n × d) bfloat16 or float16. Not run where
// the AVX2 kernels are off, r is 0 or scale is no float32 multiplier other
// than 0 (the caller's ATen path keeps those cases' semantics). kOverflowed:
// a finite c beyond the half type's range, where the caller must sum in
// float32 instead (the result may be representable).
AdapterSplit split_scaled_adapter_cpu(
    const at::Tensor& t32,
    const at::Tensor& B32,
    const std::optional<at::Tensor>& bias32,
    double scale,
    const at::Tensor& hi,
    const at::Tensor& lo);

} // namespace lowrank_ext
