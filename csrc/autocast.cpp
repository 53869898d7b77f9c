// Autocast kernels: inside torch.autocast the fused ops follow F.linear's
// policy (lower_precision_fp). Every floating-point argument on the autocast
// device, float64 excepted, is cast to the autocast dtype (float16 or
// bfloat16), and the op runs with autocast off for that device. Without these
// kernels a layer fed by an autocast F.linear gets a bfloat16 x next to its
// float32 weights and fails the dtype check, and a float32 x would give a
// float32 output where nn.Linear and peft give the autocast dtype.
//
// at::autocast::cached_cast reuses the cast of a float32 leaf parameter within
// one autocast region, as torch's own ops do. The pure-torch backend registers
// the same rule in Python (lowrank_ext/_library.py).
#include "ops.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

template <c10::DeviceType kDevice>
struct AutocastScope {
  // The op runs below autocast for this device, as torch's own autocast
  // kernels run theirs.
  c10::impl::ExcludeDispatchKeyGuard no_autocast{
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice)};
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);

  at::Tensor cast(const at::Tensor& t) const {
    return at::autocast::cached_cast(dtype, t, kDevice);
  }
  std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t) const {
    return at::autocast::cached_cast(dtype, t, kDevice);
  }
};

// kOp: the op itself or its _with_intermediate form (the same arguments).
template <c10::DeviceType kDevice, auto kOp>
auto lowrank_autocast(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  const AutocastScope<kDevice> scope;
  return kOp(scope.cast(x), scope.cast(A), scope.cast(B), scope.cast(bias));
}

template <c10::DeviceType kDevice, auto kOp>
auto lora_autocast(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  const AutocastScope<kDevice> scope;
  return kOp(scope.cast(x), scope.cast(W), scope.cast(A), scope.cast(B), scope.cast(bias), scale);
}

template <c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  m.impl("lowrank_linear", &lowrank_autocast<kDevice, &lowrank_linear_op>);
  m.impl("lowrank_linear_with_intermediate",
         &lowrank_autocast<kDevice, &lowrank_linear_with_intermediate_op>);
  m.impl("lora_linear", &lora_autocast<kDevice, &lora_linear_op>);
  m.impl("lora_linear_with_intermediate",
         &lora_autocast<kDevice, &lora_linear_with_intermediate_op>);
}

} // namespace

// Both keys exist in every torch build, so a CPU-only build of the extension
// registers the CUDA rule too; it is reached only with CUDA tensors.
TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCPU, m) {
  register_autocast<c10::DeviceType::CPU>(m);
}

TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCUDA, m) {
  register_autocast<c10::DeviceType::CUDA>(m);
}

} // namespace lowrank_ext
