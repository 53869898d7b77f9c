// lowrank_linear for few rows (decode), every dtype, on CUDA cores.
//
// With M <= 16 a row tile cannot occupy more than one SM, and the work is
// reading A and B once, so both reductions are spread over many blocks:
//
//   shrink: block (s, g, m) computes the partial sums of k-chunk s for rank
//           rows 8g..8g+7 and row group m, into an fp32 (fp64) workspace of
//           shape (splits, M, r);
//   expand: block (c, m) sums the partials of row group m in split order
//           (deterministic: no atomics), keeps t in shared memory, and writes
//           output columns [c·cols, (c+1)·cols) with the bias.
//
// For half types y is expanded from the float32 sums, as the CPU's float16
// kernel does, while the t handed back (saved for backward) is rounded to
// the input dtype: y can differ from (rounded t)·Bᵀ in its last bits, and
// from what the tensor-core and cuBLAS paths give, which expand the rounded
// t.
//
// Two launches on the same stream; the workspace comes from the caching
// allocator, so the pair is safe under CUDA-graph capture.
#pragma once

#include "lowrank_plan.h"

#include <cstdint>

namespace lowrank_ext::cuda {

template <typename acc_t>
__device__ __forceinline__ acc_t sum_lanes(acc_t v, int width) {
  // xor offsets below `width` stay inside aligned groups of `width` lanes.
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kSkThreads) split_k_shrink_kernel(
    const T* __restrict__ x, int64_t ldx, const T* __restrict__ A,
    acc_t* __restrict__ partial, int64_t M, int64_t k, int64_t r,
    int64_t k_chunk) {
  extern __shared__ __align__(16) unsigned char sk_smem[];
  acc_t* x_chunk = reinterpret_cast<acc_t*>(sk_smem); // [kSkRows][k_chunk]

  const int64_t split = blockIdx.x;
  const int64_t k0 = split * k_chunk;
  const int64_t kc = (k - k0) < k_chunk ? (k - k0) : k_chunk;
  const int64_t rank0 = static_cast<int64_t>(blockIdx.y) * kSkRankRowsPerBlock;
  const int64_t rank1 = (rank0 + kSkRankRowsPerBlock) < r ? (rank0 + kSkRankRowsPerBlock) : r;
  const int64_t i0 = static_cast<int64_t>(blockIdx.z) * kSkRows;
  const int rows = static_cast<int>((M - i0) < kSkRows ? (M - i0) : kSkRows);

  for (int64_t idx = threadIdx.x; idx < rows * kc; idx += blockDim.x) {
    const int64_t i = idx / kc;
    const int64_t c = idx % kc;
    x_chunk[i * k_chunk + c] = static_cast<acc_t>(x[(i0 + i) * ldx + k0 + c]);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int nwarps = blockDim.x / 32;
  for (int64_t j = rank0 + warp; j < rank1; j += nwarps) {
    acc_t sum[kSkRows];
#pragma unroll
    for (int i = 0; i < kSkRows; ++i) {
      sum[i] = acc_t(0);
    }
    const T* a = A + j * k + k0;
    for (int64_t c = lane; c < kc; c += 32) {
      const acc_t av = static_cast<acc_t>(a[c]);
#pragma unroll
      for (int i = 0; i < kSkRows; ++i) {
        if (i < rows) {
          sum[i] += x_chunk[i * k_chunk + c] * av;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kSkRows; ++i) {
      if (i < rows) { // uniform across the warp
        sum[i] = sum_lanes(sum[i], 32);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kSkRows; ++i) {
        if (i < rows) {
          partial[(split * M + i0 + i) * r + j] = sum[i];
        }
      }
    }
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kSkThreads) split_k_expand_kernel(
    const acc_t* __restrict__ partial, int64_t splits, const T* __restrict__ B,
    const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ t_out,
    int64_t M, int64_t r, int64_t d, int64_t cols_per_block, int lanes_per_col) {
  extern __shared__ __align__(16) unsigned char sk_smem[];
  acc_t* t = reinterpret_cast<acc_t*>(sk_smem); // [kSkRows][r]

  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kSkRows;
  const int rows = static_cast<int>((M - i0) < kSkRows ? (M - i0) : kSkRows);

  // t = the partials summed in split order, identically in every block.
  for (int64_t idx = threadIdx.x; idx < rows * r; idx += blockDim.x) {
    const int64_t i = idx / r;
    const int64_t j = idx % r;
    acc_t s = acc_t(0);
    for (int64_t sp = 0; sp < splits; ++sp) {
      s += partial[(sp * M + i0 + i) * r + j];
    }
    t[idx] = s;
    if (t_out != nullptr && blockIdx.x == 0) {
      t_out[(i0 + i) * r + j] = static_cast<T>(s);
    }
  }
  __syncthreads();

  // Each output column is reduced over r by lanes_per_col lanes; a warp
  // handles 32 / lanes_per_col columns at once.
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int nwarps = blockDim.x / 32;
  const int cols_per_warp = 32 / lanes_per_col;
  const int group = lane / lanes_per_col;
  const int group_lane = lane % lanes_per_col;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.x) * cols_per_block;
  const int64_t col_end = (col_begin + cols_per_block) < d ? (col_begin + cols_per_block) : d;
  for (int64_t base = col_begin + static_cast<int64_t>(warp) * cols_per_warp;
       base < col_end; base += static_cast<int64_t>(nwarps) * cols_per_warp) {
    const int64_t o = base + group;
    const bool valid = o < col_end;
    acc_t sum[kSkRows];
#pragma unroll
    for (int i = 0; i < kSkRows; ++i) {
      sum[i] = acc_t(0);
    }
    if (valid) {
      const T* b = B + o * r;
      for (int64_t j = group_lane; j < r; j += lanes_per_col) {
        const acc_t bv = static_cast<acc_t>(b[j]);
#pragma unroll
        for (int i = 0; i < kSkRows; ++i) {
          if (i < rows) {
            sum[i] += t[i * r + j] * bv;
          }
        }
      }
    }
    // Every lane takes part in the shuffles, valid or not.
#pragma unroll
    for (int i = 0; i < kSkRows; ++i) {
      if (i < rows) {
        sum[i] = sum_lanes(sum[i], lanes_per_col);
      }
    }
    if (valid && group_lane == 0) {
      const acc_t b0 = bias != nullptr ? static_cast<acc_t>(bias[o]) : acc_t(0);
#pragma unroll
      for (int i = 0; i < kSkRows; ++i) {
        if (i < rows) {
          y[(i0 + i) * d + o] = static_cast<T>(sum[i] + b0);
        }
      }
    }
  }
}

} // namespace lowrank_ext::cuda
