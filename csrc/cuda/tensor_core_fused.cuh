// Fused lowrank_linear forward on tensor cores (float16 / bfloat16, sm_80+):
// one launch, one block per kTcRows rows of x.
//
//   phase 1: t = x_tile · Aᵀ, streaming k in kTcK slices; the (rows × r) fp32
//            accumulators stay in the warps' registers.
//   handoff: t is rounded to the input dtype into shared memory (and written
//            to global memory only when the caller keeps it for backward).
//   phase 2: for each kTcCols slice of d: y_tile = t · B_sliceᵀ + bias, each
//            output element written exactly once.
//
// Tails in M, k, r and d are zero-filled in shared memory, so the tensor-core
// loops never branch; only the final stores are bounds-checked.
#pragma once

#include "lowrank_plan.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

namespace lowrank_ext::cuda {

template <typename T>
struct HalfConvert;

template <>
struct HalfConvert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct HalfConvert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

struct TensorCoreArgs {
  const void* x;    // (M, k), row stride ldx, unit column stride
  const void* A;    // (r, k) contiguous
  const void* B;    // (d, r) contiguous
  const void* bias; // (d) contiguous, or null
  void* y;          // (M, d) contiguous
  void* t_out;      // (M, r) contiguous, or null
  int64_t M, k, r, d, ldx;
  int rank_padded;
  int64_t stage_offset, t_offset, buf_offset;
  // 16-byte global accesses are allowed (alignment checked on the host).
  bool x_vec, a_vec, b_vec, y_vec;
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Copies rows × cols of a row-major global matrix (leading dimension ld) into
// a tile_rows × tile_cols shared tile (leading dimension lds), zero-filling
// everything outside. Elements are moved as raw 16-bit words. With vec, every
// row start is 16-byte aligned and cols is a multiple of 8 (or >= tile_cols).
__device__ __forceinline__ void load_tile_16bit(
    uint16_t* s, int lds, const uint16_t* g, int64_t ld, int rows, int cols,
    int tile_rows, int tile_cols, bool vec) {
  if (vec) {
    const int vecs_per_row = tile_cols / 8;
    for (int idx = threadIdx.x; idx < tile_rows * vecs_per_row; idx += blockDim.x) {
      const int rr = idx / vecs_per_row;
      const int cc = (idx % vecs_per_row) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (rr < rows && cc < cols) {
        v = *reinterpret_cast<const uint4*>(g + rr * ld + cc);
      }
      *reinterpret_cast<uint4*>(s + rr * lds + cc) = v;
    }
  } else {
    for (int idx = threadIdx.x; idx < tile_rows * tile_cols; idx += blockDim.x) {
      const int rr = idx / tile_cols;
      const int cc = idx % tile_cols;
      s[rr * lds + cc] = (rr < rows && cc < cols) ? g[rr * ld + cc] : uint16_t(0);
    }
  }
}

template <typename T, int kFragsPerWarp>
__global__ void __launch_bounds__(256)
tensor_core_fused_kernel(const TensorCoreArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using Convert = HalfConvert<T>;
  extern __shared__ __align__(128) unsigned char smem[];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int nwarps = blockDim.x / 32;
  const int warp_m = warp % (kTcRows / 16);
  const int warp_n = warp / (kTcRows / 16);
  const int rank_padded = p.rank_padded;
  const int ldk = kTcK + kTcPad;        // x and A slices
  const int ldr = rank_padded + kTcPad; // t tile and B slices

  float* stage = reinterpret_cast<float*>(smem + p.stage_offset) + warp * kTcStageFloats;
  T* t_tile = reinterpret_cast<T*>(smem + p.t_offset);
  uint16_t* x_slice = reinterpret_cast<uint16_t*>(smem + p.buf_offset);
  uint16_t* a_slice = x_slice + kTcRows * ldk;
  uint16_t* b_slice = reinterpret_cast<uint16_t*>(smem + p.buf_offset);

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTcRows;
  const int rows = static_cast<int>(min64(kTcRows, p.M - row0));
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + row0 * p.ldx;
  const uint16_t* A = static_cast<const uint16_t*>(p.A);
  const uint16_t* B = static_cast<const uint16_t*>(p.B);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  T* t_out = static_cast<T*>(p.t_out);

  // ---- phase 1: t = x_tile · Aᵀ -------------------------------------------
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsPerWarp];
#pragma unroll
  for (int f = 0; f < kFragsPerWarp; ++f) {
    wmma::fill_fragment(acc[f], 0.0f);
  }
  for (int64_t k0 = 0; k0 < p.k; k0 += kTcK) {
    const int cols = static_cast<int>(min64(kTcK, p.k - k0));
    __syncthreads(); // the previous slices are no longer read
    load_tile_16bit(x_slice, ldk, x + k0, p.ldx, rows, cols, kTcRows, kTcK, p.x_vec);
    load_tile_16bit(a_slice, ldk, A + k0, p.k, static_cast<int>(p.r), cols,
                    rank_padded, kTcK, p.a_vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(
          a, reinterpret_cast<const T*>(x_slice) + warp_m * 16 * ldk + kk, ldk);
#pragma unroll
      for (int f = 0; f < kFragsPerWarp; ++f) {
        // Aᵀ as a k × r operand is A's row-major slice read column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        const int col = (warp_n * kFragsPerWarp + f) * 16;
        wmma::load_matrix_sync(
            b, reinterpret_cast<const T*>(a_slice) + col * ldk + kk, ldk);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
  }

  // ---- handoff: fp32 accumulators -> t tile in the input dtype -------------
  // The fragment layout is opaque, so each fragment goes through the warp's
  // fp32 staging area.
#pragma unroll
  for (int f = 0; f < kFragsPerWarp; ++f) {
    wmma::store_matrix_sync(stage, acc[f], 16, wmma::mem_row_major);
    __syncwarp();
    const int col0 = (warp_n * kFragsPerWarp + f) * 16;
    for (int e = lane; e < kTcStageFloats; e += 32) {
      const int rr = warp_m * 16 + e / 16;
      const int cc = col0 + e % 16;
      const T v = Convert::from_float(stage[e]);
      t_tile[rr * ldr + cc] = v;
      if (t_out != nullptr && rr < rows && cc < p.r) {
        t_out[(row0 + rr) * p.r + cc] = v;
      }
    }
    __syncwarp(); // staging is rewritten by the next fragment
  }

  // ---- phase 2: y_tile = t · Bᵀ + bias, kTcCols outputs at a time ----------
  constexpr int kColFrags = kTcCols / 16;
  constexpr int kOutFrags = (kTcRows / 16) * kColFrags;
  for (int64_t n0 = 0; n0 < p.d; n0 += kTcCols) {
    const int b_rows = static_cast<int>(min64(kTcCols, p.d - n0));
    // Orders the t tile writes (first pass) and the previous slice's reads
    // (later passes) before the B slice overwrites the shared buffer.
    __syncthreads();
    load_tile_16bit(b_slice, ldr, B + n0 * p.r, p.r, b_rows, static_cast<int>(p.r),
                    kTcCols, rank_padded, p.b_vec);
    __syncthreads();
    for (int f = warp; f < kOutFrags; f += nwarps) {
      const int fm = f / kColFrags;
      const int fn = f % kColFrags;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> out;
      wmma::fill_fragment(out, 0.0f);
      for (int j = 0; j < rank_padded; j += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, t_tile + fm * 16 * ldr + j, ldr);
        wmma::load_matrix_sync(
            b, reinterpret_cast<const T*>(b_slice) + fn * 16 * ldr + j, ldr);
        wmma::mma_sync(out, a, b, out);
      }
      wmma::store_matrix_sync(stage, out, 16, wmma::mem_row_major);
      __syncwarp();
      // Two lanes per fragment row, eight consecutive outputs each.
      const int rr = lane / 2;
      const int cc = (lane % 2) * 8;
      const int64_t row = row0 + fm * 16 + rr;
      const int64_t col = n0 + fn * 16 + cc;
      if (row < p.M && col < p.d) {
        alignas(16) T vals[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float v = stage[rr * 16 + cc + e];
          if (bias != nullptr && col + e < p.d) {
            v += Convert::to_float(bias[col + e]);
          }
          vals[e] = Convert::from_float(v);
        }
        T* dst = y + row * p.d + col;
        if (p.y_vec) {
          // d is a multiple of 8, so all eight outputs are in range.
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (col + e < p.d) {
              dst[e] = vals[e];
            }
          }
        }
      }
      __syncwarp(); // staging is rewritten by the next fragment
    }
  }
#endif
}

} // namespace lowrank_ext::cuda
