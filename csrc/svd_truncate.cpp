// svd_truncate: the rank-r factors of W from its thin SVD.
//
//   balanced=false:  B = U_r·diag(S_r),   A = V_rᵀ          (the seed's form)
//   balanced=true:   B = U_r·diag(√S_r),  A = diag(√S_r)·V_rᵀ
//
// Built only from ATen ops, so one kernel serves every device (LAPACK on the
// CPU, cuSOLVER on CUDA). Half types are factorized in float32.
#include "checks.h"

#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

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

// A factor of W / root² (svd_truncate_kernel) times root `roots` times
// (never times root², which is 2^1024 for a float64 W near its largest), in
// `dtype`. Factors past the dtype's range (B = U·diag(S) where σ₁ exceeds it:
// a float16 W's beyond 65504, a float32 W's of entries near float32's
// largest) would come back as inf from a finite W: an error instead, worded
// as in lowrank_ext/_fallback.py.
at::Tensor restored_factor(
    const char* name,
    const at::Tensor& scaled,
    double root,
    int roots,
    bool balanced,
    at::ScalarType dtype) {
  at::Tensor factor = scaled;
  for (int i = 0; i < roots; ++i) {
    factor = factor * root;
  }
  at::Tensor out = factor.to(dtype).contiguous();
  if (!at::isinf(out).any().item<bool>()) {
    return out;
  }
  double size = scaled.abs().max().item<double>();
  for (int i = 0; i < roots; ++i) {
    size *= root;
  }
  double largest = std::numeric_limits<double>::max();
  const char* wider = nullptr;
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    largest = dtype == at::kHalf ? static_cast<double>(std::numeric_limits<c10::Half>::max())
                                 : static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
    // bfloat16 has float32's range: only float64 holds more.
    wider = dtype == at::kHalf ? "float32" : "float64";
  } else if (dtype == at::kFloat) {
    largest = std::numeric_limits<float>::max();
    wider = "float64";
  }
  std::string hint = balanced ? "" : "pass balanced=True";
  if (wider != nullptr) {
    hint += cat(hint.empty() ? "" : " or ", "give a ", wider, " W");
  }
  // The size itself can be past float64's range (a float64 W near its largest).
  TORCH_CHECK_VALUE(
      false, "svd_truncate: factor ", name, " has entries ",
      std::isinf(size) ? "" : cat("up to ", size, ", "), "beyond ", dtype_name(dtype),
      "'s range (largest ", largest, ")", hint.empty() ? "" : "; ", hint);
  return out;
}

std::tuple<at::Tensor, at::Tensor> svd_truncate_kernel(
    const at::Tensor& W,
    int64_t rank,
    bool balanced) {
  check_svd_inputs(W, rank);
  const bool half = W.scalar_type() == at::kHalf || W.scalar_type() == at::kBFloat16;
  const at::Tensor Wc = half ? W.to(at::kFloat) : W;
  // σ₁ can exceed the dtype's range where every entry of W is finite (4e38
  // for a 4 × 4 float32 W of 1e38), and the factors need not. The SVD runs on
  // W / root², root = 2^⌈e/2⌉ for max|W| = m·2^e (m in [0.5, 1)): a power of
  // two, so the scaling is exact and LAPACK and cuSOLVER give the same digits
  // as for W; the factors take root back. svd_operand in
  // lowrank_ext/_fallback.py computes the same root.
  int e = 0;
  std::frexp(Wc.abs().max().item<double>(), &e);
  const double root = std::ldexp(1.0, e >= 0 ? (e + 1) / 2 : e / 2);
  auto [U, S, Vh] = at::linalg_svd(Wc.div(root).div(root), /*full_matrices=*/false);
  const at::Tensor U_r = U.narrow(1, 0, rank);
  const at::Tensor S_r = S.narrow(0, 0, rank);
  const at::Tensor Vh_r = Vh.narrow(0, 0, rank);
  const at::ScalarType dtype = W.scalar_type();
  if (balanced) {
    const at::Tensor root_S = S_r.sqrt();
    at::Tensor B = restored_factor("B", U_r * root_S.unsqueeze(0), root, 1, balanced, dtype);
    return {B, restored_factor("A", Vh_r * root_S.unsqueeze(1), root, 1, balanced, dtype)};
  }
  at::Tensor B = restored_factor("B", U_r * S_r.unsqueeze(0), root, 2, balanced, dtype);
  return {B, restored_factor("A", Vh_r, root, 0, balanced, dtype)};
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
