// A small model of CUDA's execution on host threads, enough to run the
// extension's kernels (csrc/cuda/*.cuh) unchanged on a machine without a GPU:
//
//   * every thread of a block is a host thread; blocks run one after another
//     (the kernels never communicate between blocks within a launch);
//   * __syncthreads and __syncwarp are barriers over the block and the warp;
//     __shfl_xor_sync exchanges through a per-warp slot array;
//   * dynamic shared memory is one static array per `extern __shared__` name,
//     refilled with 0xFF bytes (NaN in every float type) before each block,
//     and, under AddressSanitizer, poisoned past the launch's byte count;
//   * warp-collective calls (WMMA, shuffles) check that all 32 lanes make
//     them with the same arguments.
//
// A violated rule aborts with a message naming it: the tests treat any
// abnormal exit as a failure.
#pragma once

#include <array>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(addr, size) ASAN_POISON_MEMORY_REGION(addr, size)
#define EMU_UNPOISON(addr, size) ASAN_UNPOISON_MEMORY_REGION(addr, size)
#else
#define EMU_POISON(addr, size) ((void)(addr), (void)(size))
#define EMU_UNPOISON(addr, size) ((void)(addr), (void)(size))
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}

// Cache-hinted store: on the host, a plain one.
template <typename V>
inline void __stcg(V* p, V value) {
  *p = value;
}

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulated GPU: %s (block %u,%u,%u thread %u)\n", what,
               blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

// Barriers and exchange slots of the block being run.
struct Block {
  explicit Block(unsigned threads)
      : all(static_cast<std::ptrdiff_t>(threads)), slots(threads / 32) {
    for (unsigned w = 0; w < threads / 32; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(32));
    }
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  // Two sets per warp, used alternately, so that one collective's reads
  // finish (all lanes pass the next barrier) before its set is rewritten.
  struct Published {
    uint64_t value, tag;
  };
  struct WarpSlots {
    std::array<std::array<Published, 32>, 2> sets{};
  };
  std::vector<WarpSlots> slots;
};

inline Block* current_block = nullptr;
inline thread_local unsigned collective_parity = 0;

inline void warp_barrier() {
  current_block->warps[threadIdx.x / 32]->arrive_and_wait();
}

// A warp-collective step: each lane publishes `value` and `tag`, then reads
// what every lane published. All 32 lanes must take part with the same tag
// (a collective's arguments); `what` names the rule broken otherwise.
inline const std::array<Block::Published, 32>& exchange(uint64_t value, uint64_t tag,
                                                        const char* what) {
  auto& set = current_block->slots[threadIdx.x / 32].sets[collective_parity];
  collective_parity ^= 1u;
  set[threadIdx.x % 32] = {value, tag};
  warp_barrier();
  for (const auto& lane : set) {
    if (lane.tag != tag) {
      fail(what);
    }
  }
  return set;
}

inline void check_uniform(uint64_t tag, const char* what) {
  exchange(0, tag, what);
}

// Dynamic shared memory: the kernels declare `extern __shared__` arrays;
// each name used by a kernel is defined once with this capacity.
constexpr size_t kSharedCapacity = 256 * 1024;

// Runs body() as grid × block threads; `shared` is the array the kernel
// declares and `shared_bytes` the dynamic size the launch asks for. The
// block's threads are started once per launch and run the blocks in turn.
template <typename Body>
void launch(dim3 grid, dim3 block, size_t shared_bytes, unsigned char* shared, Body body) {
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x == 0 || block.x > 1024) {
    fail("launch: block must be 1-D, a multiple of 32 threads, at most 1024");
  }
  if (shared_bytes > kSharedCapacity) {
    fail("launch: more dynamic shared memory than the emulator has");
  }
  gridDim = grid;
  blockDim = block;
  Block state(block.x);
  current_block = &state;
  // Separate from the kernel's __syncthreads barrier, so that a kernel whose
  // threads disagree on the number of __syncthreads cannot pair up with it.
  std::barrier<> between_blocks(static_cast<std::ptrdiff_t>(block.x));
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = dim3(t, 0, 0);
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            collective_parity = 0;
            if (t == 0) { // a new block finds its shared memory full of NaN
              EMU_UNPOISON(shared, kSharedCapacity);
              std::memset(shared, 0xFF, kSharedCapacity);
              EMU_POISON(shared + shared_bytes, kSharedCapacity - shared_bytes);
            }
            between_blocks.arrive_and_wait();
            body();
            between_blocks.arrive_and_wait();
          }
        }
      }
    });
  }
  for (auto& thread : threads) {
    thread.join();
  }
  current_block = nullptr;
  EMU_UNPOISON(shared, kSharedCapacity);
}

} // namespace emu

inline void __syncthreads() {
  emu::current_block->all.arrive_and_wait();
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) {
    emu::fail("__syncwarp: only the full mask is modelled");
  }
  emu::warp_barrier();
}

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a wide type");
  if (mask != 0xffffffffu) {
    emu::fail("__shfl_xor_sync: only the full mask is modelled");
  }
  uint64_t word = 0;
  std::memcpy(&word, &value, sizeof(V));
  const auto& set = emu::exchange(word, static_cast<uint64_t>(lane_mask),
                                  "__shfl_xor_sync: lanes disagree on the offset");
  const unsigned partner = (threadIdx.x % 32) ^ static_cast<unsigned>(lane_mask);
  V result;
  std::memcpy(&result, &set[partner % 32].value, sizeof(V));
  // The set is rewritten two collectives later, after a barrier every lane
  // reaches only once it has read it here.
  return result;
}
