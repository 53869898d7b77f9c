#pragma once

// Whether this build holds the x86 micro-kernels (lowrank_avx2.cpp,
// lowrank_avx512bf16.cpp): x86 with GCC, whose `#pragma GCC target`,
// intrinsics and CPU-feature builtins they rely on. Elsewhere (aarch64,
// other compilers) those files compile to nothing, x86_kernel_stubs.cpp
// stands in for them, the feature checks answer no, and every call takes the
// portable kernels. LOWRANK_EXT_NO_X86_KERNELS (setup.py:
// LOWRANK_EXT_PORTABLE=1) builds that way on x86 too, which is how the
// portable build is tested.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(LOWRANK_EXT_NO_X86_KERNELS)
#define LOWRANK_EXT_X86_KERNELS 1
#else
#define LOWRANK_EXT_X86_KERNELS 0
#endif

// Whether the compiler can ask an x86 CPU for the features half_gemm.cpp
// checks (__builtin_cpu_supports knows "avx512fp16" from GCC 12 and Clang
// 18), kernels or not: how fast ATen's half-type products run depends on the
// CPU alone.
#if (defined(__x86_64__) || defined(__i386__)) &&                   \
    ((defined(__clang__) && __clang_major__ >= 18) ||                \
     (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12))
#define LOWRANK_EXT_X86_FEATURE_CHECKS 1
#else
#define LOWRANK_EXT_X86_FEATURE_CHECKS 0
#endif
