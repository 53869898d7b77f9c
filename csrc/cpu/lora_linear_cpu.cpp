// CPU kernel of lora_linear: y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ.
//
// The dense product dominates, so it goes to BLAS once; the adapter's
// (M × r) intermediate is tiny beside it and, for float32/float64, is
// accumulated straight into the same output buffer.
#include "../checks.h"
#include "lowrank_linear_cpu.h"

#include <torch/library.h>

#include <vector>

namespace lowrank_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_linear_impl(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  check_lora_linear_inputs(x, W, A, B, bias, scale);
  const int64_t k = x.size(-1);
  const int64_t r = A.size(0);
  const int64_t d = W.size(0);
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t M = c10::multiply_integers(lead.begin(), lead.end());

  const at::Tensor x2 = x.reshape({M, k});
  at::Tensor y2 = bias.has_value() ? at::addmm(*bias, x2, W.t())
                                   : at::mm(x2, W.t());
  std::vector<int64_t> y_shape = lead, t_shape = lead;
  y_shape.push_back(d);
  t_shape.push_back(r);
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    // A half-precision (M × r) intermediate could overflow where the result
    // does not: the fused low-rank kernel keeps it in float32.
    auto [adapter, t] = lowrank_linear_cpu_impl(x2, A, B * scale, std::nullopt, true);
    y2.add_(adapter);
    return {y2.view(y_shape), t.view(t_shape)};
  }
  at::Tensor t2 = at::mm(x2, A.t());
  if (r > 0) {
    y2.addmm_(t2, B.t(), /*beta=*/1, /*alpha=*/scale);
  }
  return {y2.view(y_shape), t2.view(t_shape)};
}

at::Tensor lora_linear_cpu(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  return std::get<0>(lora_linear_impl(x, W, A, B, bias, scale));
}

} // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_with_intermediate", &lora_linear_impl);
}

} // namespace lowrank_ext
