// Calls into the lowrank_ext ops through the dispatcher, for C++ code that must
// reach whichever kernel is registered for the inputs' device (CPU, CUDA, or
// the pure-torch default). The schemas are defined in Python
// (lowrank_ext/_library.py); handles are looked up on first use.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>

namespace lowrank_ext {

at::Tensor lowrank_linear_op(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_intermediate_op(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias);

at::Tensor lora_linear_op(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale);

std::tuple<at::Tensor, at::Tensor> lora_linear_with_intermediate_op(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale);

// aᵀ·b for a (len × m), b (len × n): the CPU backward's weight gradients
// (op _weight_grad; its CPU kernel is in cpu/lowrank_linear_cpu.cpp).
at::Tensor weight_grad_op(const at::Tensor& a, const at::Tensor& b);

// g·W in float32 for float32 g (M × d) and W (d × n): lora_linear's CPU
// backward gx at a few rows (op _rows_times_weight; CPU kernel in
// cpu/lowrank_linear_cpu.cpp, which streams W there: cpu/few_rows.h).
at::Tensor rows_times_weight_op(const at::Tensor& g, const at::Tensor& W);

// Whether one of `tensors` (null ones skipped) carries a forward-mode AD
// tangent that ATen's ops would propagate; outside forward-mode AD one
// lock-free read (autograd.cpp). The direct Python entry points leave such
// calls to the Python wrapper, whose route has a forward-mode formula.
bool any_forward_grad(std::initializer_list<const at::Tensor*> tensors);

} // namespace lowrank_ext
