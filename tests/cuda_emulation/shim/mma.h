// Host stand-in for CUDA's mma.h (WMMA, 16 × 16 × 16 only). Each lane keeps
// a whole fragment, so loads and the product are computed by every lane
// alike; a store writes only the lane's own 8 of the 256 elements, as a GPU
// lane stores only its own part. As the CUDA programming guide documents,
// a load or store first waits for all lanes of the warp to arrive; every
// call also checks the guide's rules: the pointer 256-bit aligned, the
// leading dimension a multiple of 16 bytes, and the same arguments on all
// 32 lanes.
#pragma once

#include "emulated_gpu.h"

#include <cstdint>
#include <type_traits>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
struct fragment {
  static_assert(m == 16 && n == 16 && k == 16, "only 16 x 16 x 16 is modelled");
  float v[16][16];
};

namespace detail {

inline void check_pointer(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    emu::fail(what); // 256-bit alignment
  }
  if ((ldm * elem_bytes) % 16 != 0) {
    emu::fail(what);
  }
  emu::check_uniform(reinterpret_cast<uint64_t>(p) ^ (static_cast<uint64_t>(ldm) << 48), what);
}

template <typename T>
void load(float (&v)[16][16], const T* p, unsigned ldm, bool row_major_layout) {
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      v[i][j] = static_cast<float>(row_major_layout ? p[i * ldm + j] : p[i + j * ldm]);
    }
  }
}

} // namespace detail

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (auto& row : f.v) {
    for (float& e : row) {
      e = value;
    }
  }
}

// matrix_a or matrix_b, stored row- or column-major (the accumulator's load
// takes a layout argument and is not modelled).
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>,
                "only matrix_a and matrix_b fragments are loaded");
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "a matrix_a or matrix_b fragment needs a layout");
  detail::check_pointer(p, ldm, sizeof(T), "wmma::load_matrix_sync: misaligned or non-uniform");
  detail::load(f.v, p, ldm, std::is_same_v<Layout, row_major>);
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = c.v[i][j];
      for (int kk = 0; kk < 16; ++kk) {
        sum += a.v[i][kk] * b.v[kk][j];
      }
      out[i][j] = sum;
    }
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      d.v[i][j] = out[i][j];
    }
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_pointer(p, ldm, sizeof(float), "wmma::store_matrix_sync: misaligned or non-uniform");
  const unsigned lane = threadIdx.x % 32;
  for (unsigned e = lane * 8; e < lane * 8 + 8; ++e) {
    const unsigned i = e / 16, j = e % 16;
    p[layout == mem_row_major ? i * ldm + j : i + j * ldm] = f.v[i][j];
  }
}

} // namespace nvcuda::wmma
