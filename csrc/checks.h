// Input validation shared by every compiled kernel (CPU and CUDA).
//
// The pure-torch fallback (lowrank_ext/_checks.py) raises the same exception
// types with the same messages; tests compare the two word for word, so edit
// both together.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>

namespace lowrank_ext {

// Python spelling of a dtype ("float32", not "Float"), so messages read the
// same from C++ and from Python.
std::string dtype_name(at::ScalarType t);

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
      t == at::kBFloat16;
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream ss;
  (ss << ... << args);
  return ss.str();
}

// Checks one tensor argument's dtype and device against the reference tensor
// (the first argument of the op).
void check_dtype_device(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& ref,
    const char* ref_name);

// x (..., k), A (r, k), B (d, r), bias (d) or None.
void check_lowrank_linear_inputs(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias);

// x (..., k), W (d, k), A (r, k), B (d, r), bias (d) or None.
void check_lora_linear_inputs(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale);

} // namespace lowrank_ext
