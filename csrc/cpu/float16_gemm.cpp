#include "float16_gemm.h"

namespace lowrank_ext {

bool float16_gemm_is_slow(const at::Tensor& like) {
  static const bool has_fp16_products = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512fp16") != 0;
  }();
  return like.device().is_cpu() && like.scalar_type() == at::kHalf && !has_fp16_products;
}

} // namespace lowrank_ext
