#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace lowrank_ext {

// y = (x·Aᵀ)·Bᵀ + bias on the CPU; with keep_intermediate also returns the
// (..., r) intermediate x·Aᵀ that backward needs (otherwise undefined).
std::tuple<at::Tensor, at::Tensor> lowrank_linear_cpu_impl(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    bool keep_intermediate);

} // namespace lowrank_ext
