// How lowrank_linear runs on CUDA for one problem: which path and which
// tiling. Plain host C++ with no CUDA types, so the choice can be unit-tested
// on a machine without a GPU (see the lowrank_ext_internal::cuda_plan op).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lowrank_ext::cuda {

enum class Path {
  kEmpty,      // M == 0: nothing to compute
  kBiasOnly,   // r == 0 or k == 0: the product is zero, y = bias (or zeros)
  kTensorCore, // one fused launch on tensor cores (float16/bfloat16, r <= 256)
  kSplitK,     // few rows: k split across blocks, then a deterministic expand
  kCublas,     // two cuBLAS GEMMs through ATen (large r, float32, float64)
};

const char* path_name(Path path);
// "auto" gives nullopt; unknown names raise.
std::optional<Path> path_from_name(const std::string& name);

// Fused tensor-core kernel: a block owns kTcRows rows of x.
constexpr int kTcRows = 64;      // rows of x per block
constexpr int kTcK = 64;         // k-slice loaded per phase-1 step
constexpr int kTcCols = 64;      // output columns per phase-2 step
constexpr int kTcPad = 8;        // shared-memory row padding, in elements
constexpr int kTcMaxRank = 256;  // largest r kept on chip
constexpr int kTcStageFloats = 16 * 16; // per-warp fp32 staging of one fragment

// Split-K path.
constexpr int kSkRows = 16;             // rows of x per row group
constexpr int kSkThreads = 256;         // threads per block (both kernels)
constexpr int kSkRankRowsPerBlock = 8;  // rows of A per shrink block (one per warp)
constexpr int kSkMaxRank = 256;         // r held in shared memory by the expand
constexpr int kSmallM = 16;             // M up to which split-K is chosen
// The fused kernel streams a whole row tile's x, A, B and y through one SM,
// so it needs about one block per SM to reach full memory bandwidth. Below
// num_sms / kTcMinBlocksDivisor row tiles the two cuBLAS GEMMs, which spread
// every GEMM over the whole GPU, are expected to be faster. (A bound to tune
// on hardware; forcing the path bypasses it.)
constexpr int kTcMinBlocksDivisor = 2;
constexpr int64_t kMaxGridYZ = 65535;

struct ProblemDesc {
  int64_t M = 0, k = 0, r = 0, d = 0;
  bool half_type = false;  // float16 or bfloat16
  int acc_bytes = 4;       // size of the accumulation type (8 for float64)
  int sm_major = 0;        // compute capability of the device
  // Whether the loaded binary has code for this device at all (else only
  // cuBLAS can run), and whether that code holds the fused kernel's body
  // (built for sm_80 or newer); see query_device.
  bool kernels_built = true;
  bool tensor_core_built = true;
  int num_sms = 1;
  int64_t max_smem = 0;    // opt-in shared memory per block (bytes)
};

struct TensorCoreTiling {
  int frags_per_warp = 0;  // 16-wide rank fragments each warp accumulates
  int warps_n = 0;         // warps side by side along r
  int rank_padded = 0;     // r rounded up to warps_n * frags_per_warp * 16
  int threads = 0;
  int64_t blocks = 0;
  // Shared-memory layout (bytes): per-warp staging, the (rows x r) tile of
  // the intermediate, then a ring of `stages` slots, each holding an x slice
  // and an A slice in phase 1 and a B slice in phase 2.
  int stages = 0;
  int64_t ring_stage_elems = 0; // 16-bit elements per slot
  int64_t stage_offset = 0, t_offset = 0, buf_offset = 0, smem_bytes = 0;
};

struct SplitKTiling {
  int64_t splits = 0;      // blocks along k
  int64_t k_chunk = 0;     // k per split (a multiple of 32)
  int64_t rank_groups = 0; // blocks along r in the shrink
  int64_t row_groups = 0;  // blocks along M (kSkRows rows each)
  int64_t shrink_smem = 0;
  int64_t expand_cols = 0; // outputs per expand block
  int64_t expand_blocks = 0;
  int lanes_per_col = 0;   // lanes of a warp sharing one output column
  int64_t expand_smem = 0;
};

struct Plan {
  Path path = Path::kEmpty;
  TensorCoreTiling tc;
  SplitKTiling sk;
};

// Picks the path (or checks that the forced one can run) and its tiling.
Plan make_plan(const ProblemDesc& p, std::optional<Path> forced = std::nullopt);

// The plan as a flat list, for tests: tc fields then sk fields, in the order
// of the structs above.
std::vector<int64_t> plan_fields(const Plan& plan);

} // namespace lowrank_ext::cuda
