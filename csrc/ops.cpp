#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace lowrank_ext {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, "")
      .template typed<Signature>();
}

using LowRankSig = at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&);
using LowRankWithTSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&);
using LoRASig = at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, double);
using LoRAWithTSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, double);

} // namespace

at::Tensor lowrank_linear_op(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  static const auto op = find_op<LowRankSig>("lowrank_ext::lowrank_linear");
  return op.call(x, A, B, bias);
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_intermediate_op(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  static const auto op =
      find_op<LowRankWithTSig>("lowrank_ext::lowrank_linear_with_intermediate");
  return op.call(x, A, B, bias);
}

at::Tensor lora_linear_op(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  static const auto op = find_op<LoRASig>("lowrank_ext::lora_linear");
  return op.call(x, W, A, B, bias, scale);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_with_intermediate_op(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  static const auto op =
      find_op<LoRAWithTSig>("lowrank_ext::lora_linear_with_intermediate");
  return op.call(x, W, A, B, bias, scale);
}

at::Tensor weight_grad_op(const at::Tensor& a, const at::Tensor& b) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("lowrank_ext::_weight_grad");
  return op.call(a, b);
}

at::Tensor rows_times_weight_op(const at::Tensor& g, const at::Tensor& W) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>(
      "lowrank_ext::_rows_times_weight");
  return op.call(g, W);
}

} // namespace lowrank_ext
