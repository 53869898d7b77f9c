// Stand-ins for the x86 micro-kernels in builds without them (aarch64,
// MSVC, LOWRANK_EXT_NO_X86_KERNELS; see x86_kernels.h). The feature checks
// answer no, so the dispatch in lowrank_linear_cpu.cpp never calls the
// kernels; were it to, a clear error beats undefined symbols at load time.
#include "x86_kernels.h"

#if !LOWRANK_EXT_X86_KERNELS

#include "lowrank_avx2.h"
#include "lowrank_avx512bf16.h"

#include <stdexcept>

namespace lowrank_ext {
namespace {

[[noreturn]] void not_in_this_build() {
  throw std::logic_error(
      "lowrank_ext: an x86 CPU kernel was called in a build without them (internal error)");
}

} // namespace

namespace avx2 {

bool cpu_has_avx2_fma() {
  return false;
}

void shrink(ElemType, const void*, int64_t, const void*, int64_t, int64_t, int64_t, int64_t,
            float*, int64_t) {
  not_in_this_build();
}

void shrink_packed(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*,
                   int64_t, float*) {
  not_in_this_build();
}

int64_t packed_shrink_floats(int64_t) {
  not_in_this_build();
}

void expand(ElemType, const float*, int64_t, int64_t, const void*, int64_t, const void*,
            int64_t, int64_t, void*, int64_t, float*) {
  not_in_this_build();
}

void weight_grad(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                 int64_t, int64_t, float*, int64_t) {
  not_in_this_build();
}

void rows_times_weight(ElemType, const float*, int64_t, int64_t, const void*, int64_t, int64_t,
                       int64_t, int64_t, float*, int64_t) {
  not_in_this_build();
}

bool split_rounded(ElemType, const float*, int64_t, float, const float*, void*, void*) {
  not_in_this_build();
}

} // namespace avx2

namespace avx512bf16 {

void shrink(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, int64_t,
            float*, int64_t) {
  not_in_this_build();
}

void pack_shrink_weights(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*) {
  not_in_this_build();
}

void shrink_packed(const uint16_t*, int64_t, const uint32_t*, int64_t, int64_t, int64_t, float*,
                   int64_t) {
  not_in_this_build();
}

void expand(const float*, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
            int64_t, uint16_t*, int64_t, uint32_t*, const uint32_t*) {
  not_in_this_build();
}

void pack_expand_weights(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*) {
  not_in_this_build();
}

bool split_rounded(const float*, int64_t, float, const float*, uint16_t*, uint16_t*) {
  not_in_this_build();
}

} // namespace avx512bf16
} // namespace lowrank_ext

#endif // !LOWRANK_EXT_X86_KERNELS
