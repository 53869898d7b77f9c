// CPU kernel of lowrank_linear: y = (x·Aᵀ)·Bᵀ + bias, fused per block of rows.
//
// x is walked in blocks of rows. For each block the (rows × r) intermediate
// lives in a small per-task buffer and is expanded into the block's output,
// bias included, before the next block starts, so the full (M × r)
// intermediate never exists (unless the caller asks for it for backward).
// Half types are accumulated in float32.
//
// Two implementations: AVX2/FMA micro-kernels (lowrank_avx2.cpp) for
// float32/bfloat16/float16 on CPUs that have them, with bfloat16 on AVX512-BF16
// dot products where the CPU has those (lowrank_avx512bf16.cpp),
// and portable loops plus BLAS blocks everywhere else and for float64.
// `_cpu_kernel("avx2")` / `_cpu_kernel("portable")` (or LOWRANK_EXT_CPU_KERNEL)
// turn the faster sets off, so tests cover every one on one machine.
#include "../checks.h"
#include "../lowrank_operands.h"
#include "few_rows.h"
#include "half_gemm.h"
#include "lowrank_avx2.h"
#include "lowrank_avx512bf16.h"
#include "prefault.h"
#include "split_adapter.h"
#include "x86_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace lowrank_ext {

// Defined here, in portable code, rather than in lowrank_avx512bf16.cpp: that
// whole file is compiled for AVX-512, and this check must run on every CPU.
bool avx512bf16::cpu_has_avx512bf16() {
#if LOWRANK_EXT_X86_KERNELS
  static const bool has = [] {
    __builtin_cpu_init();
    // libgcc reports AVX-512 features only when the OS saves the zmm state.
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bf16");
  }();
  return has;
#else
  return false;  // no x86 kernels in this build (x86_kernels.h)
#endif
}

namespace {

// Rows per BLAS block: 64 rows of x (k ≤ 8192 floats) plus their output stay
// in L2, and the block GEMMs are still large enough to run at BLAS speed.
constexpr int64_t kBlasRowBlock = 64;
// Multiply-adds below which a parallel region costs more than it saves.
constexpr int64_t kParallelGrainFlops = 1 << 15;

template <typename T, typename acc_t>
inline acc_t dot(const T* a, const T* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  }
  return sum;
}

template <typename T, typename acc_t>
inline acc_t dot_acc(const acc_t* a, const T* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += a[i] * static_cast<acc_t>(b[i]);
  }
  return sum;
}

struct Problem {
  int64_t M, k, r, d;
  int64_t ldx; // row stride of x (elements); may be 0 for broadcast rows
};

// y[o] = bias[o] + Σ_j t[j]·B[o, j] for o in [o0, o1).
template <typename T, typename acc_t>
inline void expand_row(
    const acc_t* t, const T* B, const T* bias, T* y, int64_t r,
    int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    acc_t s = dot_acc<T, acc_t>(t, B + o * r, r);
    if (bias != nullptr) {
      s += static_cast<acc_t>(bias[o]);
    }
    y[o] = static_cast<T>(s);
  }
}

// Direct loops, one row at a time: the fast path for few rows, where BLAS
// call overhead dominates, and the generic path for every dtype.
template <typename T>
void rowwise(
    const Problem& p, const T* x, const T* A, const T* B, const T* bias, T* y,
    T* t_out) {
  using acc_t = at::opmath_type<T>;
  const int64_t flops_per_row = p.r * (p.k + p.d);
  if (p.M == 1 && flops_per_row >= 2 * kParallelGrainFlops) {
    // A single wide row (decode): split the rank and the outputs instead.
    std::vector<acc_t> t(p.r);
    at::parallel_for(0, p.r, std::max<int64_t>(1, kParallelGrainFlops / std::max<int64_t>(p.k, 1)),
        [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            t[j] = dot<T, acc_t>(x, A + j * p.k, p.k);
          }
        });
    if (t_out != nullptr) {
      for (int64_t j = 0; j < p.r; ++j) t_out[j] = static_cast<T>(t[j]);
    }
    at::parallel_for(0, p.d, std::max<int64_t>(1, kParallelGrainFlops / std::max<int64_t>(p.r, 1)),
        [&](int64_t o0, int64_t o1) {
          expand_row<T, acc_t>(t.data(), B, bias, y, p.r, o0, o1);
        });
    return;
  }
  const int64_t grain =
      std::max<int64_t>(1, kParallelGrainFlops / std::max<int64_t>(flops_per_row, 1));
  at::parallel_for(0, p.M, grain, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> t(p.r);
    for (int64_t i = i0; i < i1; ++i) {
      const T* xi = x + i * p.ldx;
      for (int64_t j = 0; j < p.r; ++j) {
        t[j] = dot<T, acc_t>(xi, A + j * p.k, p.k);
      }
      if (t_out != nullptr) {
        for (int64_t j = 0; j < p.r; ++j) {
          t_out[i * p.r + j] = static_cast<T>(t[j]);
        }
      }
      expand_row<T, acc_t>(t.data(), B, bias, y + i * p.d, p.r, 0, p.d);
    }
  });
}

// Blocks of rows through BLAS (float32/float64 only). Tensors are built with
// from_blob over raw pointers, so no autograd metadata reaches worker threads.
template <typename T>
void blocked_blas(
    const Problem& p, const T* x, const T* A, const T* B, const T* bias, T* y,
    T* t_out) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor At = at::from_blob(const_cast<T*>(A), {p.r, p.k}, opts).t();
  const at::Tensor Bt = at::from_blob(const_cast<T*>(B), {p.d, p.r}, opts).t();
  std::optional<at::Tensor> bias_t;
  if (bias != nullptr) {
    bias_t = at::from_blob(const_cast<T*>(bias), {p.d}, opts);
  }
  const int64_t blocks = (p.M + kBlasRowBlock - 1) / kBlasRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor tbuf = at::empty({kBlasRowBlock, p.r}, opts);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row0 = b * kBlasRowBlock;
      const int64_t rows = std::min(kBlasRowBlock, p.M - row0);
      const at::Tensor xb = at::from_blob(
          const_cast<T*>(x) + row0 * p.ldx, {rows, p.k}, {p.ldx, 1}, opts);
      prefault_for_write(y + row0 * p.d, rows * p.d * int64_t{sizeof(T)});
      at::Tensor yb = at::from_blob(y + row0 * p.d, {rows, p.d}, opts);
      at::Tensor tb = t_out != nullptr
          ? at::from_blob(t_out + row0 * p.r, {rows, p.r}, opts)
          : tbuf.narrow(0, 0, rows);
      at::mm_out(tb, xb, At);
      if (bias_t.has_value()) {
        at::addmm_out(yb, *bias_t, tb, Bt);
      } else {
        at::mm_out(yb, tb, Bt);
      }
    }
  });
}

// ---------------------------------------------------------------- AVX2 path

// Rows per block when threads split the rows: enough rows to amortise the
// walk over A and B per block, few enough that the float32 block
// intermediate (rows × r) stays in L2.
constexpr int64_t kMaxRowBlock = 192;
// The packed float32 shrink: from this rank (one panel of 16) and this many
// rows per thread, with blocks of up to kMaxPackedRowBlock rows (t of r ≤ 256
// stays within 512 KB).
constexpr int64_t kPackedMinRank = 16;
constexpr int64_t kPackedMinRows = 96;
constexpr int64_t kMaxPackedRowBlock = 512;
// Multiply-adds below which the AVX2 path stays on the calling thread
// (about 10 µs of work): waking the other threads costs a few microseconds on
// a quiet machine, so a decode-sized call (1 × 4096 × 16 × 4096) already
// gains from the second core.
constexpr int64_t kMinParallelMacs = 1 << 17;
// Fewer rows than this per thread: threads split the rank and the outputs
// instead of the rows.
constexpr int64_t kMinRowsPerThread = 32;
// Rank columns / outputs handed to a thread at a time: the tile widths of
// the shrink and of the expand's panels.
constexpr int64_t kRankUnit = 4;
constexpr int64_t kOutputUnit = 16;

// The most capable kernel set allowed: kAuto uses whatever the CPU runs.
enum class KernelLimit : int { kAuto, kAvx2, kPortable };

KernelLimit initial_limit() {
  const char* env = std::getenv("LOWRANK_EXT_CPU_KERNEL");
  if (env != nullptr && std::strcmp(env, "portable") == 0) {
    return KernelLimit::kPortable;
  }
  if (env != nullptr && std::strcmp(env, "avx2") == 0) {
    return KernelLimit::kAvx2;
  }
  return KernelLimit::kAuto;
}

std::atomic<KernelLimit> g_kernel_limit{initial_limit()};

bool use_avx2() {
  return g_kernel_limit.load(std::memory_order_relaxed) != KernelLimit::kPortable &&
      avx2::cpu_has_avx2_fma();
}

bool use_avx512bf16() {
  return g_kernel_limit.load(std::memory_order_relaxed) == KernelLimit::kAuto &&
      avx2::cpu_has_avx2_fma() && avx512bf16::cpu_has_avx512bf16();
}

template <typename T>
constexpr avx2::ElemType avx2_type() {
  if constexpr (std::is_same_v<T, float>) {
    return avx2::ElemType::kFloat32;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    return avx2::ElemType::kBFloat16;
  } else {
    return avx2::ElemType::kFloat16;
  }
}

// The shrink of one block: rows of x against ranks [j0, j1) of A.
template <typename T>
void shrink_block(
    bool bf16_dot, const T* x, int64_t ldx, const T* A, int64_t k, int64_t rows, int64_t j0,
    int64_t j1, float* t, int64_t ldt) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (bf16_dot) {
      avx512bf16::shrink(
          reinterpret_cast<const uint16_t*>(x), ldx, reinterpret_cast<const uint16_t*>(A), k,
          rows, j0, j1, t, ldt);
      return;
    }
  }
  avx2::shrink(avx2_type<T>(), x, ldx, A, k, rows, j0, j1, t, ldt);
}

// Scratch that the kernels write in full before they read it, or null for
// n = 0 (a null packed B tells the expand to pack as it goes). std::vector
// would zero it first: for the packed weights that was 4 % of a 256-row
// bfloat16 call.
template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  // (new T[n], not C++20's make_unique_for_overwrite: torch 2.11 builds
  // extensions as C++17.)
  return n > 0 ? std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]) : nullptr;
}

// Rows from which the bfloat16 expand runs on AVX512-BF16: below, packing B
// into pairs costs more than the faster products save.
constexpr int64_t kBf16DotMinRows = 8;

// The bfloat16 shrink over packed A (avx512bf16::shrink_packed): from this
// rank and this many rows per thread. Below, packing A once per call costs
// about what its tiles save (measured at parity with 128 rows per thread at
// r = 64, 5 % faster from 256, 9 % at 1024; at r = 16 no faster).
constexpr int64_t kBf16PackedShrinkMinRank = 32;
constexpr int64_t kBf16PackedShrinkMinRows = 192;
// Rows per block on that path are a multiple of this: whole shrink tiles (6
// rows at r ≥ 49) and whole expand tiles (12 rows).
constexpr int64_t kBf16BlockRowUnit = 12;

// Scratch 32-bit words the expand of a block of `rows` needs.
int64_t bf16_expand_words(bool bf16_dot, int64_t rows, int64_t r) {
  return bf16_dot && rows >= kBf16DotMinRows ? avx512bf16::expand_scratch_words(rows, r) : 0;
}

// The expand of one block: outputs [o0, o1) of its rows.
// `bf16_packed`: B packed once for the whole call (avx512bf16::
// pack_expand_weights), or null.
template <typename T>
void expand_block(
    bool bf16_dot, const float* t, int64_t ldt, int64_t rows, const T* B, int64_t r,
    const T* bias, int64_t o0, int64_t o1, T* y, int64_t ldy, float* panel,
    uint32_t* bf16_scratch, const uint32_t* bf16_packed = nullptr) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (bf16_dot && rows >= kBf16DotMinRows) {
      avx512bf16::expand(
          t, ldt, rows, reinterpret_cast<const uint16_t*>(B), r,
          reinterpret_cast<const uint16_t*>(bias), o0, o1, reinterpret_cast<uint16_t*>(y), ldy,
          bf16_scratch, bf16_packed);
      return;
    }
  }
  avx2::expand(avx2_type<T>(), t, ldt, rows, B, r, bias, o0, o1, y, ldy, panel);
}

template <typename T>
void store_intermediate(const float* t, int64_t rows, int64_t r, T* t_out) {
  for (int64_t i = 0; i < rows * r; ++i) {
    t_out[i] = static_cast<T>(t[i]);
  }
}

// Grain, in units of `unit_flops` multiply-adds, below which a loop runs on
// the calling thread.
int64_t grain_for(int64_t unit_flops) {
  return std::max<int64_t>(1, kParallelGrainFlops / std::max<int64_t>(unit_flops, 1));
}

template <typename T>
void avx2_kernel(
    const Problem& p, const T* x, const T* A, const T* B, const T* bias, T* y,
    T* t_out) {
  const bool bf16_dot = std::is_same_v<T, at::BFloat16> && use_avx512bf16();
  const int64_t macs = p.M * p.r * (p.k + p.d);
  const int64_t threads = macs >= kMinParallelMacs ? at::get_num_threads() : 1;
  if (threads == 1 || p.M >= kMinRowsPerThread * threads) {
    // Many rows: each thread takes whole row blocks, shrinking a block into a
    // float32 buffer and expanding it at once. The block count is a multiple
    // of the thread count so that no thread waits on a last odd block.
    // float32 with a rank of at least one panel packs A per block instead of
    // reading it in place (avx2::shrink_packed); its larger blocks repay the
    // packing, which costs r·k moves per block.
    const bool packed = std::is_same_v<T, float> && p.r >= kPackedMinRank &&
        p.M >= kPackedMinRows * threads;
    const int64_t max_rows = packed ? kMaxPackedRowBlock : kMaxRowBlock;
    int64_t blocks = (p.M + max_rows - 1) / max_rows;
    blocks = (blocks + threads - 1) / threads * threads;
    // bfloat16 from enough rows: the shrink runs broadcast tiles over A
    // packed into pairs once per call (avx512bf16::shrink_packed), and blocks
    // hold whole tiles of rows (6 for that shrink, 12 for the expand), so
    // that no block ends in a thin tile that reads all of A for a few rows.
    const bool bf16_packed_shrink = bf16_dot && p.r >= kBf16PackedShrinkMinRank &&
        p.M >= kBf16PackedShrinkMinRows * threads;
    const int64_t unit = bf16_packed_shrink ? kBf16BlockRowUnit : 1;
    const int64_t units = (p.M + unit - 1) / unit;
    const int64_t rows_per_block = (units + blocks - 1) / blocks * unit;
    auto block_start = [&](int64_t b) { return std::min(p.M, b * units / blocks * unit); };
    // The bfloat16 dot-product expand reads B packed into pairs, and the
    // packed shrink A: packed once here, by all threads in one parallel
    // region, instead of once per block. (A 32-output panel of B and a
    // 16-pair block of A are the same number of words at r ≤ 64.)
    constexpr int64_t kCols = avx512bf16::kExpandPanelCols;
    const bool bf16_pack_b = bf16_dot && rows_per_block >= kBf16DotMinRows;
    const int64_t b_panels = bf16_pack_b ? (p.d + kCols - 1) / kCols : 0;
    const int64_t pairs = (p.k + 1) / 2;
    const int64_t a_blocks = bf16_packed_shrink ? (pairs + 15) / 16 : 0;
    auto bf16_packed =
        uninitialized<uint32_t>(bf16_pack_b ? avx512bf16::packed_expand_words(p.d, p.r) : 0);
    auto bf16_packed_a =
        uninitialized<uint32_t>(a_blocks > 0 ? avx512bf16::packed_shrink_words(p.r, p.k) : 0);
    if (b_panels + a_blocks > 0) {
      const int64_t grain = grain_for(kCols * p.r * 16);
      at::parallel_for(0, b_panels + a_blocks, grain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          if (i < b_panels) {
            avx512bf16::pack_expand_weights(reinterpret_cast<const uint16_t*>(B), p.r, p.d,
                                            i * kCols, std::min(p.d, (i + 1) * kCols),
                                            bf16_packed.get());
          } else {
            const int64_t q0 = (i - b_panels) * 16;
            avx512bf16::pack_shrink_weights(reinterpret_cast<const uint16_t*>(A), p.r, p.k, q0,
                                            std::min(pairs, q0 + 16), bf16_packed_a.get());
          }
        }
      });
    }
    at::parallel_for(0, blocks, threads == 1 ? blocks : 1, [&](int64_t b0, int64_t b1) {
      // Every kernel writes its scratch before reading it: none is zeroed.
      auto t = uninitialized<float>(rows_per_block * p.r);
      auto panel = uninitialized<float>(avx2::expand_panel_floats(p.r));
      auto packed_a = uninitialized<float>(packed ? avx2::packed_shrink_floats(p.r) : 0);
      auto bf16_scratch =
          uninitialized<uint32_t>(bf16_expand_words(bf16_dot, rows_per_block, p.r));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row0 = block_start(b);
        const int64_t rows = block_start(b + 1) - row0;
        if (rows <= 0) {
          continue;
        }
        // Each thread maps its own block's output pages, in parallel.
        prefault_for_write(y + row0 * p.d, rows * p.d * int64_t{sizeof(T)});
        if constexpr (std::is_same_v<T, float>) {
          if (packed) {
            avx2::shrink_packed(x + row0 * p.ldx, p.ldx, A, p.k, p.r, rows, t.get(), p.r,
                                packed_a.get());
          }
        }
        if (a_blocks > 0) {
          avx512bf16::shrink_packed(reinterpret_cast<const uint16_t*>(x + row0 * p.ldx), p.ldx,
                                    bf16_packed_a.get(), p.k, p.r, rows, t.get(), p.r);
        } else if (!packed) {
          shrink_block(bf16_dot, x + row0 * p.ldx, p.ldx, A, p.k, rows, 0, p.r, t.get(), p.r);
        }
        if (t_out != nullptr) {
          store_intermediate(t.get(), rows, p.r, t_out + row0 * p.r);
        }
        expand_block(bf16_dot, t.get(), p.r, rows, B, p.r, bias, 0, p.d, y + row0 * p.d, p.d,
                     panel.get(), bf16_scratch.get(), bf16_packed.get());
      }
    });
    return;
  }
  // Few rows (decode): threads split the rank for the shrink, then the
  // outputs for the expand, one chunk of rows at a time.
  const int64_t chunk = std::min(p.M, kMaxRowBlock);
  auto t = uninitialized<float>(chunk * p.r);
  const int64_t r_units = (p.r + kRankUnit - 1) / kRankUnit;
  const int64_t d_units = (p.d + kOutputUnit - 1) / kOutputUnit;
  for (int64_t row0 = 0; row0 < p.M; row0 += chunk) {
    const int64_t rows = std::min(chunk, p.M - row0);
    const T* xb = x + row0 * p.ldx;
    at::parallel_for(0, r_units, grain_for(rows * p.k * kRankUnit), [&](int64_t u0, int64_t u1) {
      shrink_block(bf16_dot, xb, p.ldx, A, p.k, rows, u0 * kRankUnit,
                   std::min(p.r, u1 * kRankUnit), t.get(), p.r);
    });
    if (t_out != nullptr) {
      store_intermediate(t.get(), rows, p.r, t_out + row0 * p.r);
    }
    at::parallel_for(0, d_units, grain_for(rows * p.r * kOutputUnit), [&](int64_t u0, int64_t u1) {
      auto panel = uninitialized<float>(avx2::expand_panel_floats(p.r));
      auto bf16_scratch = uninitialized<uint32_t>(bf16_expand_words(bf16_dot, rows, p.r));
      expand_block(bf16_dot, t.get(), p.r, rows, B, p.r, bias, u0 * kOutputUnit,
                   std::min(p.d, u1 * kOutputUnit), y + row0 * p.d, p.d, panel.get(),
                   bf16_scratch.get());
    });
  }
}

template <typename T>
void run_kernel(
    const Problem& p, const T* x, const T* A, const T* B, const T* bias, T* y,
    T* t_out) {
  constexpr bool kBlasType = std::is_same_v<T, float> || std::is_same_v<T, double>;
  // BLAS wins once a block has enough rows and columns to amortise its call.
  const bool use_blas = kBlasType && p.M >= 16 && p.r >= 4 && p.ldx == p.k &&
      p.r * (p.k + p.d) >= 4096;
  constexpr bool kAvx2Type = !std::is_same_v<T, double>;
  if constexpr (kAvx2Type) {
    if (use_avx2()) {
      avx2_kernel<T>(p, x, A, B, bias, y, t_out);
      return;
    }
  }
  if constexpr (kBlasType) {
    if (use_blas) {
      blocked_blas<T>(p, x, A, B, bias, y, t_out);
      return;
    }
  }
  rowwise<T>(p, x, A, B, bias, y, t_out);
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_cpu_impl(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    bool keep_intermediate) {
  // Errors name the public op, also when autograd reached it through
  // lowrank_linear_with_intermediate.
  const char* op = "lowrank_linear";
  check_lowrank_linear_inputs(op, x, A, B, bias);
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU kernel got x on ", x.device());
  const LowRankOperands ops = prepare_lowrank_operands(x, A, B, bias, keep_intermediate);
  if (ops.done) {
    return {ops.y, ops.t};
  }
  const Problem p{ops.M, ops.k, ops.r, ops.d, ops.x2.stride(0)};

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_linear_cpu", [&] {
        run_kernel<scalar_t>(
            p, ops.x2.const_data_ptr<scalar_t>(), ops.A2.const_data_ptr<scalar_t>(),
            ops.B2.const_data_ptr<scalar_t>(),
            ops.bias2.defined() ? ops.bias2.const_data_ptr<scalar_t>() : nullptr,
            ops.y.mutable_data_ptr<scalar_t>(),
            keep_intermediate ? ops.t.mutable_data_ptr<scalar_t>() : nullptr);
      });
  return {ops.y, ops.t};
}

at::Tensor lowrank_linear_cpu(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  return std::get<0>(lowrank_linear_cpu_impl(x, A, B, bias, false));
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_intermediate_cpu(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  return lowrank_linear_cpu_impl(x, A, B, bias, true);
}

// a (len × m)ᵀ · b (len × n): the products of the backward (weight gradients,
// whose contraction runs over the batch rows, and below the fused backward's
// row count gx = gt·A too). float32 with the AVX2 kernels runs the broadcast tile over
// column panels of b, reading a in place through its strides; everything
// else is ATen's mm.
void check_weight_grad_inputs(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0),
              "_weight_grad: expected a (len, m) and b (len, n), got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "_weight_grad: a is ",
              dtype_name(a.scalar_type()), " but b is ", dtype_name(b.scalar_type()));
}

// Maps a fresh output's pages before a kernel whose threads write it column
// panel by column panel, with the threads splitting the pages.
void prefault_in_parallel(void* data, int64_t bytes) {
  if (bytes < kPrefaultMinBytes) {
    return;
  }
  const int64_t chunks = std::max<int64_t>(1, bytes / kPrefaultMinBytes);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    char* begin = static_cast<char*>(data) + bytes * c0 / chunks;
    char* end = static_cast<char*>(data) + bytes * c1 / chunks;
    prefault_for_write(begin, end - begin);
  });
}

// Work items per thread the weight gradient aims for, so that threads finish
// together when rows and panels do not divide evenly.
constexpr int64_t kWeightGradItemsPerThread = 4;

at::Tensor weight_grad_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_weight_grad_inputs(a, b);
  const int64_t len = a.size(0), m = a.size(1), n = b.size(1);
  if (a.scalar_type() != at::kFloat || !use_avx2() || len == 0 || m == 0 || n == 0) {
    return at::mm(a.t(), b);
  }
  const at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
  at::Tensor G = at::empty({m, n}, a.options());
  // L = aᵀ: L[i, j] = a[j, i], read in place.
  const float* Lp = a.const_data_ptr<float>();
  const int64_t ldl = a.stride(1), ldj = a.stride(0);
  const float* bp = bc.const_data_ptr<float>();
  float* Gp = G.mutable_data_ptr<float>();
  const int64_t ldb = bc.stride(0);
  // Items are (row block of G) × (block of kWeightGradCols columns). Few
  // column blocks (a small rank) are split into row blocks too, so that every
  // thread has work; a row block repacks its columns of b, which costs
  // 1 / rows of its products.
  const int64_t col_blocks = (n + avx2::kWeightGradCols - 1) / avx2::kWeightGradCols;
  const int64_t wanted = kWeightGradItemsPerThread * at::get_num_threads();
  const int64_t row_blocks =
      col_blocks >= wanted ? 1 : std::min((m + 5) / 6, (wanted + col_blocks - 1) / col_blocks);
  const int64_t block_rows = ((m + row_blocks - 1) / row_blocks + 5) / 6 * 6;
  const int64_t items = (m + block_rows - 1) / block_rows * col_blocks;
  prefault_in_parallel(Gp, m * n * int64_t{sizeof(float)});
  const int64_t item_cols = std::min(n, avx2::kWeightGradCols);
  at::parallel_for(0, items, grain_for(block_rows * item_cols * len), [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t row0 = item / col_blocks * block_rows;
      const int64_t c0 = item % col_blocks * avx2::kWeightGradCols;
      const int64_t rows = std::min(block_rows, m - row0);
      avx2::weight_grad(Lp + row0 * ldl, ldl, ldj, rows, len, bp, ldb, c0,
                        std::min(n, c0 + avx2::kWeightGradCols), Gp + row0 * n, n);
    }
  });
  return G;
}

// Selects the CPU kernels: "auto" (the best the CPU runs), "avx2" (no
// AVX-512) or "portable"; "" only asks. Returns the most capable set now in
// use: "avx512bf16" (for bfloat16; AVX2 for the other types), "avx2" or
// "portable".
std::string select_cpu_kernel(const std::string& choice) {
  TORCH_CHECK(
      choice.empty() || choice == "auto" || choice == "avx2" || choice == "portable",
      "_cpu_kernel: expected \"auto\", \"avx2\", \"portable\" or \"\", got \"", choice,
      "\"");
  if (!choice.empty()) {
    g_kernel_limit.store(
        choice == "portable" ? KernelLimit::kPortable
            : choice == "avx2" ? KernelLimit::kAvx2
                               : KernelLimit::kAuto);
  }
  return use_avx512bf16() ? "avx512bf16" : use_avx2() ? "avx2" : "portable";
}

// Turns the prefaulting of fresh outputs (prefault.h) on or off; None only
// asks. Returns the setting now in effect.
bool select_cpu_prefault(std::optional<bool> enabled) {
  if (enabled.has_value()) {
    set_prefault_enabled(*enabled);
  }
  return prefault_enabled();
}

} // namespace

// Rows of W per kernel call in few_rows_product_cpu: a k-chunk of 32 rows
// (1024 float32 or 2048 bfloat16 columns) is 128 KB. 32 and 64 measured
// alike, 128 and unblocked slower.
constexpr int64_t kStreamBlockRows = 32;

bool use_few_rows_dense(const at::Tensor& x, int64_t rows) {
  // Where ATen has no fast GEMM in a half type (cpu/half_gemm.h), its
  // one-row product is still fast (float16 here: 0.84 ms against 1.38 for
  // the stream at 4096 × 4096), but from 2 rows it is not (1.37× slower at 2
  // rows, 2.37× at 16), up to where lora_linear widens the product to float32.
  if (half_gemm_is_slow(x)) {
    return rows >= 2 && rows < kWidenDenseMinRows;
  }
  // Whole lora_linear calls, ATen's GEMM / the stream, 2 Zen 4 cores, r = 16,
  // interleaved in one process:
  //   float32 at 4096 × 4096: 1.76, 2.93, 2.09, 1.75, 1.53, 1.27, 1.21, 0.94
  //     at 1, 4, 8, 16, 32, 64, 128, 256 rows; at (k, d) = (1024, 1024),
  //     (768, 3072), (3072, 768), (512, 512): 1.13–1.19 at 128 rows, 0.99–1.09
  //     at 192;
  //   bfloat16 (oneDNN, AVX512-BF16) at 4096 × 4096: 2.80, 2.01, 1.67, 1.35,
  //     1.16, 1.07, 1.00 at 1, 4, 8, 16, 32, 64, 128 rows; at the other shapes
  //     1.12–1.44 at 32 rows, 0.96–1.15 at 64.
  // float16 with AVX512-FP16 has not been measured: ATen keeps it.
  switch (x.scalar_type()) {
    case at::kFloat: return rows >= 1 && rows <= 128;
    case at::kBFloat16: return rows >= 1 && rows <= 32;
    default: return false;
  }
}

namespace {

// The stream kernels run where the AVX2 kernels do, for float32 and the
// 16-bit types.
bool can_stream(at::ScalarType type) {
  return use_avx2() && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf);
}

} // namespace

at::Tensor few_rows_product_cpu(const at::Tensor& x2, const at::Tensor& W) {
  // A single column has no column stride to speak of (torch calls such a
  // tensor contiguous whatever its stride, so .contiguous() keeps it).
  TORCH_CHECK(x2.dim() == 2 && W.dim() == 2 && x2.size(1) == W.size(1) &&
                  (x2.stride(1) == 1 || x2.size(1) <= 1) &&
                  W.is_contiguous() && x2.scalar_type() == W.scalar_type(),
              "few_rows_product_cpu: expected x (M, k) with unit column stride and a "
              "contiguous W (n, k) of its dtype, got ", x2.sizes(), " and ", W.sizes());
  const auto type = x2.scalar_type();
  if (!can_stream(type)) {
    return at::Tensor();
  }
  const int64_t M = x2.size(0), k = x2.size(1), n = W.size(0);
  at::Tensor out = at::empty({M, n}, x2.options().dtype(at::kFloat));
  if (M == 0 || n == 0) {
    return out;
  }
  if (k == 0) {  // an empty sum; the kernels expect at least one term
    return out.zero_();
  }
  float* o = out.mutable_data_ptr<float>();
  const int64_t units = (n + kRankUnit - 1) / kRankUnit;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "few_rows_product", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const bool bf16_dot = std::is_same_v<scalar_t, at::BFloat16> && use_avx512bf16();
      const scalar_t* x = x2.const_data_ptr<scalar_t>();
      const scalar_t* w = W.const_data_ptr<scalar_t>();
      at::parallel_for(0, units, grain_for(M * k * kRankUnit), [&](int64_t u0, int64_t u1) {
        // The kernels sweep their rows of W once per tile of x's rows. Given
        // kStreamBlockRows rows at a time, the k-chunk being swept stays in
        // L2 and W is read from memory once, whatever M (unblocked, a
        // thread's 2048 rows of a 4096 × 4096 W were read again for every
        // tile: 1.6× the time at 8 rows, 1.9× at 16).
        const int64_t end = std::min(n, u1 * kRankUnit);
        for (int64_t j0 = u0 * kRankUnit; j0 < end; j0 += kStreamBlockRows) {
          shrink_block(bf16_dot, x, x2.stride(0), w, k, M, j0,
                       std::min(end, j0 + kStreamBlockRows), o, n);
        }
      });
    }
  });
  return out;
}

// Tile of split_scaled_adapter_cpu: 64 rows × 256 float32 outputs (64 KB)
// stay in L2 between the expand that writes them and the split that reads them.
constexpr int64_t kSplitTileRows = 64;
constexpr int64_t kSplitTileCols = 256;

AdapterSplit split_scaled_adapter_cpu(
    const at::Tensor& t32,
    const at::Tensor& B32,
    const std::optional<at::Tensor>& bias32,
    double scale,
    const at::Tensor& hi,
    const at::Tensor& lo) {
  const auto type = hi.scalar_type();
  const int64_t n = t32.size(0), r = t32.size(1), d = B32.size(0);
  const float s = static_cast<float>(scale);
  if (!use_avx2() || (type != at::kBFloat16 && type != at::kHalf) || r == 0 ||
      !(std::abs(scale) <= std::numeric_limits<float>::max()) || s == 0.0f) {
    return AdapterSplit::kNotRun;
  }
  TORCH_CHECK(t32.scalar_type() == at::kFloat && B32.scalar_type() == at::kFloat &&
                  t32.is_contiguous() && B32.is_contiguous() && B32.size(1) == r &&
                  lo.scalar_type() == type && hi.is_contiguous() && lo.is_contiguous() &&
                  hi.sizes() == at::IntArrayRef({n, d}) && lo.sizes() == hi.sizes() &&
                  (!bias32.has_value() ||
                   (bias32->scalar_type() == at::kFloat && bias32->is_contiguous() &&
                    bias32->numel() == d)),
              "split_scaled_adapter_cpu: unexpected operands ", t32.sizes(), ", ", B32.sizes(),
              ", ", hi.sizes(), ", ", lo.sizes());
  if (n == 0 || d == 0) {
    return AdapterSplit::kDone;
  }
  const auto et = type == at::kBFloat16 ? avx2::ElemType::kBFloat16 : avx2::ElemType::kFloat16;
  // The split takes as long as the expand on AVX2 (0.5 ms at 512 × 4096);
  // on 512-bit vectors, a third of that.
  const bool split512 = type == at::kBFloat16 && use_avx512bf16();
  const float* t = t32.const_data_ptr<float>();
  const float* B = B32.const_data_ptr<float>();
  const float* bias = bias32.has_value() ? bias32->const_data_ptr<float>() : nullptr;
  auto* h = static_cast<uint16_t*>(hi.mutable_data_ptr());
  auto* l = static_cast<uint16_t*>(lo.mutable_data_ptr());
  const int64_t units = (d + kSplitTileCols - 1) / kSplitTileCols;
  std::atomic<bool> overflowed{false};
  at::parallel_for(0, units, grain_for(n * r * kSplitTileCols), [&](int64_t u0, int64_t u1) {
    bool any = false;
    auto tile = uninitialized<float>(kSplitTileRows * kSplitTileCols);
    auto panel = uninitialized<float>(avx2::expand_panel_floats(r));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t o0 = u * kSplitTileCols;
      const int64_t w = std::min(kSplitTileCols, d - o0);
      for (int64_t i0 = 0; i0 < n; i0 += kSplitTileRows) {
        const int64_t rows = std::min(kSplitTileRows, n - i0);
        avx2::expand(avx2::ElemType::kFloat32, t + i0 * r, r, rows, B + o0 * r, r, nullptr, 0,
                     w, tile.get(), w, panel.get());
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t at = (i0 + i) * d + o0;
          const float* row = tile.get() + i * w;
          const float* b = bias != nullptr ? bias + o0 : nullptr;
          any |= split512 ? avx512bf16::split_rounded(row, w, s, b, h + at, l + at)
                          : avx2::split_rounded(et, row, w, s, b, h + at, l + at);
        }
      }
    }
    if (any) {
      overflowed.store(true, std::memory_order_relaxed);
    }
  });
  return overflowed.load() ? AdapterSplit::kOverflowed : AdapterSplit::kDone;
}

bool use_few_rows_backward(const at::Tensor& gy, int64_t rows) {
  // Measured on lora_linear's training step at 4096 × 4096 (r = 16), 2 Zen 4
  // cores, ATen / stream: float16 without a fast ATen GEMM 29–97× at 1–32
  // rows (ATen's float16 gy·W took 108 ms at one row); bfloat16 on oneDNN
  // 1.24, 1.03, 0.94 at 1, 2, 4 rows (1.07–1.35 and 1.01–1.10 at 1 and 2 in
  // later runs). float32, the backward alone, with the panel kernel for 4 rows
  // and more (avx2::rows_times_weight): 0.88–0.90 at 1 row, 1.57–1.96 at 2,
  // 1.54–1.91 at 4–16, 1.32–1.69 at 32–128 and 1.07–1.11 at 512 rows of
  // 4096 × 4096; at 16 rows of (k, d) = (1024, 1024), (768, 3072), (3072, 768)
  // 1.21, 1.02, 1.38, but at 64 rows 1.00, 0.91, 1.32. Where the half type's
  // GEMM is slow, the backward widens to float32 from 64 rows instead.
  if (half_gemm_is_slow(gy)) {
    return rows >= 1 && rows < kWidenDenseMinRows;
  }
  switch (gy.scalar_type()) {
    case at::kFloat: return rows >= 2 && rows <= 16;
    case at::kBFloat16: return rows == 1;
    default: return false;
  }
}

namespace {

// The _rows_times_weight op's CPU kernel: g·W in float32, streaming a
// contiguous W in its own layout where the AVX2 kernels run
// (avx2::rows_times_weight), ATen's product on a float32 copy of W otherwise.
at::Tensor rows_times_weight_cpu(const at::Tensor& g, const at::Tensor& W) {
  TORCH_CHECK(g.dim() == 2 && W.dim() == 2 && g.size(1) == W.size(0),
              "_rows_times_weight: expected g (M, d) and W (d, n), got ", g.sizes(), " and ",
              W.sizes());
  TORCH_CHECK(g.scalar_type() == at::kFloat && at::isFloatingType(W.scalar_type()),
              "_rows_times_weight: expected float32 g and a floating-point W, got ",
              dtype_name(g.scalar_type()), " and ", dtype_name(W.scalar_type()));
  const auto type = W.scalar_type();
  if (!W.is_contiguous() || !can_stream(type)) {
    return g.mm(W.to(at::kFloat));
  }
  const at::Tensor gc = g.stride(1) == 1 ? g : g.contiguous();
  const int64_t M = g.size(0), d = W.size(0), n = W.size(1);
  // Not zeroed here: the kernel zeroes its own columns first (d = 0 included).
  at::Tensor out = at::empty({M, n}, g.options());
  if (M == 0 || n == 0) {
    return out;
  }
  const avx2::ElemType elem = type == at::kFloat ? avx2::ElemType::kFloat32
      : type == at::kBFloat16 ? avx2::ElemType::kBFloat16
                              : avx2::ElemType::kFloat16;
  // Column chunks of 512: eight rows of outputs stay in L1 (16 KB).
  constexpr int64_t kChunk = 512;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const float* gp = gc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const void* wp = W.const_data_ptr();
  at::parallel_for(0, chunks, grain_for(M * d * kChunk), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      avx2::rows_times_weight(elem, gp, gc.stride(0), M, wp, d, n, q * kChunk,
                              std::min(n, (q + 1) * kChunk), op, n);
    }
  });
  return out;
}

} // namespace

TORCH_LIBRARY_FRAGMENT(lowrank_ext, m) {
  m.def("_cpu_kernel(str choice) -> str", &select_cpu_kernel);
  m.def("_cpu_prefault(bool? enabled=None) -> bool", &select_cpu_prefault);
}

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("lowrank_linear", &lowrank_linear_cpu);
  m.impl("lowrank_linear_with_intermediate", &lowrank_linear_with_intermediate_cpu);
  m.impl("_weight_grad", &weight_grad_cpu);
  m.impl("_rows_times_weight", &rows_times_weight_cpu);
}

} // namespace lowrank_ext
