// The internal ops that expose the CUDA plan (and a path-forcing entry
// point) to tests; the plan itself is in lowrank_plan.cpp.
#include "lowrank_plan.h"

#include <torch/library.h>

namespace lowrank_ext::cuda {

namespace {

std::tuple<std::string, std::vector<int64_t>> cuda_plan_op(
    int64_t M, int64_t k, int64_t r, int64_t d, at::ScalarType dtype,
    int64_t sm_major, int64_t num_sms, int64_t max_smem, c10::string_view path,
    bool tensor_core_built, bool kernels_built) {
  ProblemDesc p;
  p.M = M, p.k = k, p.r = r, p.d = d;
  p.half_type = dtype == at::kHalf || dtype == at::kBFloat16;
  p.acc_bytes = dtype == at::kDouble ? 8 : 4;
  p.sm_major = static_cast<int>(sm_major);
  p.num_sms = static_cast<int>(num_sms);
  p.max_smem = max_smem;
  p.tensor_core_built = tensor_core_built;
  p.kernels_built = kernels_built;
  const Plan plan = make_plan(p, path_from_name(std::string(path)));
  return {path_name(plan.path), plan_fields(plan)};
}

} // namespace

// Internal ops for tests: the plan for a described problem (runs anywhere),
// and lowrank_linear with a forced CUDA path (kernel in lowrank_linear_cuda.cu).
TORCH_LIBRARY(lowrank_ext_internal, m) {
  m.def(
      "cuda_plan(int M, int k, int r, int d, ScalarType dtype, int sm_major, "
      "int num_sms, int max_smem, str path, bool tensor_core_built=True, "
      "bool kernels_built=True) -> (str, int[])",
      &cuda_plan_op);
  m.def(
      "lowrank_linear_cuda_path(Tensor x, Tensor A, Tensor B, Tensor? bias, "
      "str path, bool keep_intermediate=True) -> (Tensor, Tensor)");
}

} // namespace lowrank_ext::cuda
