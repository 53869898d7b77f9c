// The extension's CUDA kernels (csrc/cuda/*.cuh), compiled for the emulated
// GPU of shim/emulated_gpu.h, with a model of cp.async in place of the PTX
// in csrc/cuda/async_copy.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emulated_gpu.h"

#include <deque>
#include <vector>

namespace emu {

// When an asynchronous copy lands: at once (a buffer overwritten while
// another warp still reads it shows), or as late as the PTX rules allow, at
// the cp.async.wait_group that covers it (data read before its wait shows).
enum class CopyTiming { kAtIssue, kAtWait };
inline CopyTiming copy_timing = CopyTiming::kAtIssue;

struct PendingCopy {
  void* dst;
  const void* src;
  bool fill;
};

inline void land(const PendingCopy& copy) {
  if (copy.fill) {
    std::memcpy(copy.dst, copy.src, 16);
  } else {
    std::memset(copy.dst, 0, 16); // src-size 0: zeros land, nothing is read
  }
}

inline thread_local std::vector<PendingCopy> open_group;
inline thread_local std::deque<std::vector<PendingCopy>> committed_groups;

// Called when a thread leaves the kernel: nothing may still be in flight.
inline void check_no_copies_in_flight() {
  if (!open_group.empty() || !committed_groups.empty()) {
    fail("cp.async copies still in flight when the thread exits");
  }
}

} // namespace emu

#define LOWRANK_EXT_CUDA_ASYNC_COPY_CUH // replaces csrc/cuda/async_copy.cuh

namespace lowrank_ext::cuda {

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool fill) {
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) {
    emu::fail("cp.async: a 16-byte copy with a misaligned address");
  }
  const emu::PendingCopy copy{smem_dst, gmem_src, fill};
  if (emu::copy_timing == emu::CopyTiming::kAtIssue) {
    emu::land(copy);
  } else {
    emu::open_group.push_back(copy);
  }
}

inline void cp_async_commit() {
  emu::committed_groups.push_back(std::move(emu::open_group));
  emu::open_group.clear();
}

template <int kPending>
inline void cp_async_wait() {
  while (emu::committed_groups.size() > static_cast<size_t>(kPending)) {
    for (const emu::PendingCopy& copy : emu::committed_groups.front()) {
      emu::land(copy);
    }
    emu::committed_groups.pop_front();
  }
}

// The dynamic shared memory each kernel declares (extern __shared__).
alignas(128) unsigned char smem[emu::kSharedCapacity];
alignas(16) unsigned char sk_smem[emu::kSharedCapacity];

} // namespace lowrank_ext::cuda

// The kernels' bodies are compiled for sm_80 and newer only.
#define __CUDA_ARCH__ 800
#include "split_k.cuh"
#include "tensor_core_fused.cuh"
#undef __CUDA_ARCH__
