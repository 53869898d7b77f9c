// CUDA kernel of lora_linear: y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ.
//
// The dense GEMM dominates and cuBLAS runs it at full speed; the adapter's
// expand is accumulated into that same output (beta = 1), so the (M × d)
// adapter term is never materialised. Three cuBLAS calls on the current
// stream; cuBLAS accumulates half types in fp32 and honours allow_tf32.
#include "../checks.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

namespace lowrank_ext::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_linear_with_intermediate_cuda(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  check_lora_linear_inputs(x, W, A, B, bias, scale);
  TORCH_CHECK(x.is_cuda(), "lora_linear: CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t k = x.size(-1);
  const int64_t r = A.size(0);
  const int64_t d = W.size(0);
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t M = c10::multiply_integers(lead.begin(), lead.end());

  const at::Tensor x2 = x.reshape({M, k});
  at::Tensor y2 = bias.has_value() ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());
  const at::Tensor t2 = at::mm(x2, A.t());
  if (r > 0 && M > 0) {
    y2.addmm_(t2, B.t(), /*beta=*/1, /*alpha=*/scale);
  }
  std::vector<int64_t> y_shape = lead, t_shape = lead;
  y_shape.push_back(d);
  t_shape.push_back(r);
  return {y2.view(y_shape), t2.view(t_shape)};
}

at::Tensor lora_linear_cuda(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  return std::get<0>(lora_linear_with_intermediate_cuda(x, W, A, B, bias, scale));
}

} // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_with_intermediate", &lora_linear_with_intermediate_cuda);
}

} // namespace lowrank_ext::cuda
