// lora_linear: y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ, one kernel for every device.
//
// The dense product dominates, so it goes to the device's BLAS (MKL, cuBLAS)
// once; on the CPU at a few rows, where it is a stream over W, it goes to the
// shrink kernels instead (cpu/few_rows.h), with the adapter summed in float32.
// Otherwise, for float32/float64 the adapter's (M × r) intermediate is tiny
// beside it and its expand is accumulated straight into the same output
// buffer. For half types the adapter runs through the device's fused
// lowrank_linear kernel and is added to the base output. bfloat16 folds the
// scale into B (free: B is small), since bfloat16 has float32's range;
// float16 scales the adapter's output instead, as peft's composition scales
// B·(A·x), since B·scale would overflow float16 for a large scale (B·1000
// past 65504) and underflow it for a small one. Where that kernel expands
// from float32 sums (the CPU's
// float16 kernels, CUDA's split-K path for a few rows) the intermediate
// cannot overflow; CUDA's tensor-core and cuBLAS paths, and the CPU's
// AVX512-BF16 expand, round it to the input dtype first, as peft's
// composition does.
#include "checks.h"
#include "ops.h"
#include "cpu/few_rows.h"
#include "cpu/half_gemm.h"

#include <ATen/DimVector.h>
#include <ATen/ScalarOps.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

// y += scale·t·Bᵀ. addmm with alpha = 0 skips the product (BLAS semantics),
// which would drop a NaN or an infinity of the adapter that the composition
// x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ (peft's, and the fallback's) propagates as
// NaN; scale = 0 is rare, so it takes the product and scales it.
void add_scaled_adapter(at::Tensor& y, const at::Tensor& t, const at::Tensor& Bt, double scale) {
  if (scale == 0.0) {
    y.add_(at::mm(t, Bt).mul_(0.0));
  } else {
    y.addmm_(t, Bt, /*beta=*/1, /*alpha=*/scale);
  }
}

std::tuple<at::Tensor, at::Tensor> lora_linear_with_intermediate_kernel(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  check_lora_linear_inputs(x, W, A, B, bias, scale);
  const c10::OptionalDeviceGuard device_guard(x.device());
  const int64_t k = x.size(-1);
  const int64_t r = A.size(0);
  const int64_t d = W.size(0);
  at::DimVector lead(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t M = c10::multiply_integers(lead.begin(), lead.end());
  at::DimVector y_shape = lead, t_shape = lead;
  y_shape.push_back(d);
  t_shape.push_back(r);

  const at::Tensor x2 = x.reshape({M, k});
  if (x.device().is_cpu() && use_few_rows_dense(x, M) && W.is_contiguous()) {
    // Few rows: both products stream their weights through the shrink
    // kernels (cpu/few_rows.h), summed in float32 and rounded once.
    const at::Tensor xr = x2.stride(1) == 1 ? x2 : x2.contiguous();
    at::Tensor y32 = few_rows_product_cpu(xr, W);
    if (y32.defined()) {
      const at::Tensor t32 = few_rows_product_cpu(xr, A.contiguous());
      if (r > 0) {
        add_scaled_adapter(y32, t32, B.t().to(at::kFloat), scale);
      }
      if (bias.has_value()) {
        y32.add_(bias->to(at::kFloat));
      }
      return {y32.to(x.scalar_type()).view(y_shape), t32.to(x.scalar_type()).view(t_shape)};
    }
  }
  at::Tensor y2;
  if (half_gemm_is_slow(x) && M >= kWidenDenseMinRows) {
    // No fast GEMM in this half type here (cpu/half_gemm.h): the dense
    // product runs in float32 and rounds once, as ATen's half GEMMs round
    // their float32 sums once.
    const at::Tensor W32 = W.to(at::kFloat);
    y2 = (bias.has_value() ? at::addmm(bias->to(at::kFloat), x2.to(at::kFloat), W32.t())
                           : at::mm(x2.to(at::kFloat), W32.t()))
             .to(x.scalar_type());
  } else {
    y2 = bias.has_value() ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());
  }
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    if (x.scalar_type() == at::kBFloat16) {
      auto [adapter, t] = lowrank_linear_with_intermediate_op(x2, A, B * scale, std::nullopt);
      y2.add_(adapter);
      return {y2.view(y_shape), t.view(t_shape)};
    }
    auto [adapter, t] = lowrank_linear_with_intermediate_op(x2, A, B, std::nullopt);
    // The scale as a wrapped number, as Python passes one, so that the
    // product is taken in float32: a Scalar, or add_'s alpha, is rounded to
    // float16 first (1e-8 becomes 0, 1e-6 loses 1.3 %).
    y2.add_(adapter.mul_(at::native::wrapped_scalar_tensor(scale)));
    return {y2.view(y_shape), t.view(t_shape)};
  }
  const at::Tensor t2 = at::mm(x2, A.t());
  if (r > 0 && M > 0) {
    add_scaled_adapter(y2, t2, B.t(), scale);
  }
  return {y2.view(y_shape), t2.view(t_shape)};
}

at::Tensor lora_linear_kernel(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  return std::get<0>(lora_linear_with_intermediate_kernel(x, W, A, B, bias, scale));
}

} // namespace

// Registered per device so that backend_info() and the dispatcher agree on
// which devices run compiled code.
TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear_kernel);
  m.impl("lora_linear_with_intermediate", &lora_linear_with_intermediate_kernel);
}

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("lora_linear", &lora_linear_kernel);
  m.impl("lora_linear_with_intermediate", &lora_linear_with_intermediate_kernel);
}

} // namespace lowrank_ext
