#include "half_gemm.h"
#include "x86_kernels.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

namespace lowrank_ext {

bool half_gemm_is_slow(const at::Tensor& like) {
  if (!like.device().is_cpu()) {
    return false;
  }
  const bool half = like.scalar_type() == at::kHalf;
  if (!half && like.scalar_type() != at::kBFloat16) {
    return false;
  }
  const char* env = std::getenv("LOWRANK_EXT_WIDEN_HALF");
  if (env != nullptr && std::strcmp(env, "1") == 0) {
    return true;
  }
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    return false;
  }
#if LOWRANK_EXT_X86_FEATURE_CHECKS
  static const bool fast_float16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512fp16") != 0;
  }();
  static const bool fast_bfloat16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
#else
  // No feature check here: widened, as on an x86 CPU without those
  // features (the results are the same either way; only the speed differs).
  constexpr bool fast_float16 = false;
  constexpr bool fast_bfloat16 = false;
#endif
  return half ? !fast_float16 : !fast_bfloat16;
}

namespace {

// Whether the CPU products of this dtype run widened (for backend_info).
bool widens_on_cpu(at::ScalarType dtype) {
  return half_gemm_is_slow(at::empty({0}, at::TensorOptions().dtype(dtype)));
}

} // namespace

TORCH_LIBRARY_FRAGMENT(lowrank_ext, m) {
  m.def("_cpu_widen_half(ScalarType dtype) -> bool", &widens_on_cpu);
}

} // namespace lowrank_ext
