// Fused lowrank_linear forward on tensor cores (float16 / bfloat16, sm_80+):
// one launch, one block per kTcRows rows of x.
//
//   phase 1: t = x_tile · Aᵀ, streaming k in kTcK slices through a ring of
//            cp.async buffers; the (rows × r) fp32 accumulators stay in the
//            warps' registers.
//   handoff: t is rounded to the input dtype into shared memory (and written
//            to global memory only when the caller keeps it for backward).
//   phase 2: for each kTcCols slice of d: y_tile = t · B_sliceᵀ + bias, each
//            output element written exactly once.
//
// Tails in M, k, r and d are zero-filled in shared memory, so the tensor-core
// loops never branch; only the final stores are bounds-checked.
#pragma once

#include "async_copy.cuh"
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
  static __device__ __forceinline__ unsigned short bits(__half v) { return __half_as_ushort(v); }
};

template <>
struct HalfConvert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ unsigned short bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
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
  int stages;               // slices in the shared-memory ring (2 or 3)
  int64_t ring_stage_elems; // 16-bit elements per ring slot
  int64_t stage_offset, t_offset, buf_offset;
  // 16-byte global accesses are allowed (alignment checked on the host).
  bool x_vec, a_vec, b_vec, y_vec;
};

// The kernel's arguments for one problem and its tiling. Plain host code,
// shared by the launch and by the host emulation of the kernel.
inline TensorCoreArgs make_tensor_core_args(
    const TensorCoreTiling& tiling, const void* x, int64_t ldx, const void* A,
    const void* B, const void* bias, void* y, void* t_out, int64_t M, int64_t k,
    int64_t r, int64_t d) {
  TensorCoreArgs args;
  args.x = x, args.A = A, args.B = B, args.bias = bias, args.y = y, args.t_out = t_out;
  args.M = M, args.k = k, args.r = r, args.d = d, args.ldx = ldx;
  args.rank_padded = tiling.rank_padded;
  args.stages = tiling.stages;
  args.ring_stage_elems = tiling.ring_stage_elems;
  args.stage_offset = tiling.stage_offset;
  args.t_offset = tiling.t_offset;
  args.buf_offset = tiling.buf_offset;
  // 16-byte accesses need every row start aligned: the base pointer and the
  // row length (or stride) in multiples of 8 elements.
  const auto aligned16 = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0;
  };
  args.x_vec = aligned16(x) && k % 8 == 0 && ldx % 8 == 0;
  args.a_vec = aligned16(A) && k % 8 == 0;
  args.b_vec = aligned16(B) && r % 8 == 0;
  args.y_vec = aligned16(y) && d % 8 == 0;
  return args;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// The newest slice may stay in flight with three buffers; with two, none.
__device__ __forceinline__ void wait_for_oldest_slice(int stages) {
  if (stages >= 3) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// Starts copying rows × cols of a row-major global matrix (leading dimension
// ld) into a tile_rows × tile_cols shared tile (leading dimension lds),
// zero-filling everything outside. Elements move as raw 16-bit words. With
// vec, every row start is 16-byte aligned and cols is a multiple of 8, and
// the copy is asynchronous (cp.async); otherwise it is done synchronously.
// Either way it is visible to the block after the next __syncthreads that
// follows a cp_async_wait covering it.
__device__ __forceinline__ void load_tile_16bit(
    uint16_t* s, int lds, const uint16_t* g, int64_t ld, int rows, int cols,
    int tile_rows, int tile_cols, bool vec) {
  if (vec) {
    const int vecs_per_row = tile_cols / 8;
    for (int idx = threadIdx.x; idx < tile_rows * vecs_per_row; idx += blockDim.x) {
      const int rr = idx / vecs_per_row;
      const int cc = (idx % vecs_per_row) * 8;
      const bool inside = rr < rows && cc < cols;
      // Outside the matrix the source is never read; g stays a valid address.
      cp_async_16(s + rr * lds + cc, inside ? g + rr * ld + cc : g, inside);
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

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTcRows;
  const int rows = static_cast<int>(min64(kTcRows, p.M - row0));
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + row0 * p.ldx;
  const uint16_t* A = static_cast<const uint16_t*>(p.A);
  const uint16_t* B = static_cast<const uint16_t*>(p.B);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  T* t_out = static_cast<T*>(p.t_out);

  // Shared memory ring of `stages` slices: phase 1 holds an x slice and an A
  // slice per stage, phase 2 a B slice per stage. A slice is loaded
  // stages - 1 steps ahead of its use.
  const int stages = p.stages;
  uint16_t* ring = reinterpret_cast<uint16_t*>(smem + p.buf_offset);
  const int64_t stage_elems = p.ring_stage_elems;

  // ---- phase 1: t = x_tile · Aᵀ -------------------------------------------
  auto load_k_slice = [&](int64_t step) {
    uint16_t* xs = ring + (step % stages) * stage_elems;
    uint16_t* as = xs + kTcRows * ldk;
    const int64_t k0 = step * kTcK;
    const int cols = static_cast<int>(min64(kTcK, p.k - k0));
    load_tile_16bit(xs, ldk, x + k0, p.ldx, rows, cols, kTcRows, kTcK, p.x_vec);
    load_tile_16bit(as, ldk, A + k0, p.k, static_cast<int>(p.r), cols, rank_padded,
                    kTcK, p.a_vec);
  };
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsPerWarp];
#pragma unroll
  for (int f = 0; f < kFragsPerWarp; ++f) {
    wmma::fill_fragment(acc[f], 0.0f);
  }
  const int64_t k_steps = (p.k + kTcK - 1) / kTcK;
  for (int s = 0; s < stages - 1; ++s) {
    if (s < k_steps) {
      load_k_slice(s);
    }
    cp_async_commit(); // empty groups keep the counting uniform
  }
  for (int64_t step = 0; step < k_steps; ++step) {
    wait_for_oldest_slice(stages);
    // The slice of `step` is visible to all, and every warp is done with the
    // buffer that the next load overwrites (it held step - 1).
    __syncthreads();
    if (step + stages - 1 < k_steps) {
      load_k_slice(step + stages - 1);
    }
    cp_async_commit();
    const T* xs = reinterpret_cast<const T*>(ring + (step % stages) * stage_elems);
    const T* as = xs + kTcRows * ldk;
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, xs + warp_m * 16 * ldk + kk, ldk);
#pragma unroll
      for (int f = 0; f < kFragsPerWarp; ++f) {
        // Aᵀ as a k × r operand is A's row-major slice read column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        const int col = (warp_n * kFragsPerWarp + f) * 16;
        wmma::load_matrix_sync(b, as + col * ldk + kk, ldk);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads(); // every warp is done with the ring: it now takes B slices

  // ---- phase 2 prologue: start loading B while t is handed off -------------
  auto load_b_slice = [&](int64_t step) {
    uint16_t* bs = ring + (step % stages) * stage_elems;
    const int64_t n0 = step * kTcCols;
    load_tile_16bit(bs, ldr, B + n0 * p.r, p.r, static_cast<int>(min64(kTcCols, p.d - n0)),
                    static_cast<int>(p.r), kTcCols, rank_padded, p.b_vec);
  };
  const int64_t n_steps = (p.d + kTcCols - 1) / kTcCols;
  for (int s = 0; s < stages - 1; ++s) {
    if (s < n_steps) {
      load_b_slice(s);
    }
    cp_async_commit();
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
      // Columns past r are padding: A's zero-filled rows gave them Σ x·0,
      // which is NaN where x holds an infinity, and NaN times B's zero
      // padding would reach every output of the row. They must be 0.
      const T v = Convert::from_float(cc < p.r ? stage[e] : 0.0f);
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
  for (int64_t step = 0; step < n_steps; ++step) {
    wait_for_oldest_slice(stages);
    // B slice of `step` and (first step) the whole t tile are visible; the
    // buffer the next load overwrites is no longer read.
    __syncthreads();
    if (step + stages - 1 < n_steps) {
      load_b_slice(step + stages - 1);
    }
    cp_async_commit();
    const T* bs = reinterpret_cast<const T*>(ring + (step % stages) * stage_elems);
    const int64_t n0 = step * kTcCols;
    for (int f = warp; f < kOutFrags; f += nwarps) {
      const int fm = f / kColFrags;
      const int fn = f % kColFrags;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> out;
      wmma::fill_fragment(out, 0.0f);
      for (int j = 0; j < rank_padded; j += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, t_tile + fm * 16 * ldr + j, ldr);
        wmma::load_matrix_sync(b, bs + fn * 16 * ldr + j, ldr);
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
          // d is a multiple of 8, so all eight outputs are in range. A plain
          // uint4 assignment compiles to four 32-bit stores; __stcg gives one
          // 16-byte store (st.global.cg.v4), cached in L2 only: y is written
          // once and not read back by this kernel.
          uint32_t words[4];
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            words[w] = static_cast<uint32_t>(Convert::bits(vals[2 * w])) |
                (static_cast<uint32_t>(Convert::bits(vals[2 * w + 1])) << 16);
          }
          __stcg(reinterpret_cast<uint4*>(dst), make_uint4(words[0], words[1], words[2], words[3]));
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
  cp_async_wait<0>(); // nothing may be in flight when the block exits
#endif
}

// The kernel for a tiling's fragments per warp (every count the plan can
// choose is instantiated here), or null. Shared by the launch and by the
// host emulation, so that both run the same instantiations.
template <typename T>
auto tensor_core_kernel_for(int frags_per_warp) -> void (*)(TensorCoreArgs) {
  switch (frags_per_warp) {
    case 1: return &tensor_core_fused_kernel<T, 1>;
    case 2: return &tensor_core_fused_kernel<T, 2>;
    case 4: return &tensor_core_fused_kernel<T, 4>;
    case 8: return &tensor_core_fused_kernel<T, 8>;
  }
  return nullptr;
}

} // namespace lowrank_ext::cuda
