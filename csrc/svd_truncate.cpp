// svd_truncate: the rank-r factors of W from its thin SVD.
//
//   balanced=false:  B = U_r·diag(S_r),   A = V_rᵀ          (the seed's form)
//   balanced=true:   B = U_r·diag(√S_r),  A = diag(√S_r)·V_rᵀ
//
// Built only from ATen ops, so one kernel serves every device (LAPACK on the
// CPU, cuSOLVER on CUDA). Half types are factorized in float32.
#include "checks.h"

#include <torch/library.h>

#include <limits>

namespace lowrank_ext {
namespace {

void check_svd_inputs(const at::Tensor& W, int64_t rank) {
  TORCH_CHECK_VALUE(
      W.dim() == 2, "svd_truncate: W must be 2-D (d, k), got shape ", W.sizes());
  TORCH_CHECK_VALUE(
      W.numel() > 0, "svd_truncate: W must not be empty, got shape ", W.sizes());
  TORCH_CHECK_TYPE(
      is_supported_float(W.scalar_type()),
      "svd_truncate: W must be float32, float64, float16 or bfloat16, got ",
      dtype_name(W.scalar_type()));
  const int64_t max_rank = std::min(W.size(0), W.size(1));
  TORCH_CHECK_VALUE(
      rank >= 1 && rank <= max_rank, "svd_truncate: rank must be in [1, ",
      max_rank, "] for W of shape ", W.sizes(), ", got ", rank);
  TORCH_CHECK_VALUE(
      at::isfinite(W).all().item<bool>(),
      "svd_truncate: W contains NaN or Inf");
}

// Factors past the half dtype's range (B = U·diag(S) of a float16 W whose σ
// exceed 65504) would come back as inf from a finite W: an error instead,
// worded as in lowrank_ext/_fallback.py.
void check_factors_fit(
    const at::Tensor& B,
    const at::Tensor& A,
    const at::Tensor& out_B,
    const at::Tensor& out_A,
    bool balanced,
    at::ScalarType dtype) {
  const double largest = dtype == at::kHalf
      ? static_cast<double>(std::numeric_limits<c10::Half>::max())
      : static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
  const char* hint =
      balanced ? "give a float32 W" : "pass balanced=True or give a float32 W";
  auto check = [&](const char* name, const at::Tensor& factor, const at::Tensor& out) {
    TORCH_CHECK_VALUE(
        !at::isinf(out).any().item<bool>(), "svd_truncate: factor ", name,
        " has entries up to ", factor.abs().max().item<double>(), ", beyond ",
        dtype_name(dtype), "'s range (largest ", largest, "); ", hint);
  };
  check("B", B, out_B);
  check("A", A, out_A);
}

std::tuple<at::Tensor, at::Tensor> svd_truncate_kernel(
    const at::Tensor& W,
    int64_t rank,
    bool balanced) {
  check_svd_inputs(W, rank);
  const bool half = W.scalar_type() == at::kHalf || W.scalar_type() == at::kBFloat16;
  const at::Tensor Wc = half ? W.to(at::kFloat) : W;
  auto [U, S, Vh] = at::linalg_svd(Wc, /*full_matrices=*/false);
  const at::Tensor U_r = U.narrow(1, 0, rank);
  const at::Tensor S_r = S.narrow(0, 0, rank);
  const at::Tensor Vh_r = Vh.narrow(0, 0, rank);
  at::Tensor B, A;
  if (balanced) {
    const at::Tensor root = S_r.sqrt();
    B = U_r * root.unsqueeze(0);
    A = Vh_r * root.unsqueeze(1);
  } else {
    B = U_r * S_r.unsqueeze(0);
    A = Vh_r.contiguous();
  }
  at::Tensor out_B = B.to(W.scalar_type()).contiguous();
  at::Tensor out_A = A.to(W.scalar_type()).contiguous();
  if (half) {
    check_factors_fit(B, A, out_B, out_A, balanced, W.scalar_type());
  }
  return {out_B, out_A};
}

} // namespace

// One kernel, registered per device so that backend_info() and the
// dispatcher agree on which devices run compiled code.
TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("svd_truncate", &svd_truncate_kernel);
}

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("svd_truncate", &svd_truncate_kernel);
}

} // namespace lowrank_ext
