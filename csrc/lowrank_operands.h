// Output allocation and operand layout shared by the CPU and CUDA kernels of
// lowrank_linear, so that both treat shapes, empty problems and strides alike.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace lowrank_ext {

struct LowRankOperands {
  int64_t M, k, r, d;
  // Outputs, shaped (..., d) and (..., r); t is undefined unless kept.
  at::Tensor y, t;
  // M, r or k is zero: y (and t) already hold the answer, nothing to launch.
  bool done;
  // x as (M, k) rows with unit column stride (any row stride, 0 included for
  // broadcast rows); A, B contiguous; bias contiguous or undefined.
  at::Tensor x2, A2, B2, bias2;
};

// Expects inputs that passed check_lowrank_linear_inputs.
LowRankOperands prepare_lowrank_operands(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    bool keep_intermediate);

} // namespace lowrank_ext
