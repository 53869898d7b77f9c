// Asynchronous global -> shared copies (cp.async, sm_80+) for the fused
// tensor-core kernel.
//
// Classic include guard instead of #pragma once on purpose: the host
// emulation of the kernels (tests/cuda_emulation) defines this guard and
// supplies its own versions of these three functions, which model when the
// copies land, so that the kernel's use of them can be checked without a GPU.
#ifndef LOWRANK_EXT_CUDA_ASYNC_COPY_CUH
#define LOWRANK_EXT_CUDA_ASYNC_COPY_CUH

namespace lowrank_ext::cuda {

// cp.async (sm_80+): 16 bytes global -> shared without passing through
// registers, so several slices can be in flight while the warps compute.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool fill) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = fill ? 16 : 0; // 0: nothing is read, 16 zero bytes land
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(gmem_src), "r"(src_bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

} // namespace lowrank_ext::cuda

#endif // LOWRANK_EXT_CUDA_ASYNC_COPY_CUH
