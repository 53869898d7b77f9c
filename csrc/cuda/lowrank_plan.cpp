// Path and tile selection for the CUDA kernels of lowrank_linear. Host C++
// that needs only c10's error macros, so that the host emulation of the
// kernels (tests/cuda_emulation) can build it without torch.
#include "lowrank_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace lowrank_ext::cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int64_t round_up(int64_t a, int64_t b) {
  return ceil_div(a, b) * b;
}

// Shared-memory regions start on 128-byte boundaries, so that every WMMA
// fragment pointer (a multiple of 32 bytes inside a region) stays aligned.
constexpr int64_t kSmemAlign = 128;

// Tiling with `stages` ring slots; smem_bytes tells whether it fits.
TensorCoreTiling tile_tensor_core(const ProblemDesc& p, int stages) {
  TensorCoreTiling t;
  // Few fragments per warp for small r (no idle warps), at most 8 for r = 256
  // (64 accumulator registers per thread).
  if (p.r <= 16) {
    t.frags_per_warp = 1, t.warps_n = 1;
  } else if (p.r <= 32) {
    t.frags_per_warp = 2, t.warps_n = 1;
  } else if (p.r <= 64) {
    t.frags_per_warp = 2, t.warps_n = 2;
  } else if (p.r <= 128) {
    t.frags_per_warp = 4, t.warps_n = 2;
  } else {
    t.frags_per_warp = 8, t.warps_n = 2;
  }
  t.rank_padded = t.warps_n * t.frags_per_warp * 16;
  t.threads = 32 * (kTcRows / 16) * t.warps_n;
  t.blocks = ceil_div(p.M, kTcRows);
  constexpr int64_t elem = 2; // float16 / bfloat16
  const int64_t stage = (t.threads / 32) * kTcStageFloats * 4;
  const int64_t t_tile = kTcRows * (t.rank_padded + kTcPad) * elem;
  const int64_t phase1 = (kTcRows + t.rank_padded) * (kTcK + kTcPad) * elem;
  const int64_t phase2 = kTcCols * (t.rank_padded + kTcPad) * elem;
  const int64_t slot = round_up(std::max(phase1, phase2), kSmemAlign);
  t.stages = stages;
  t.ring_stage_elems = slot / elem;
  t.stage_offset = 0;
  t.t_offset = round_up(stage, kSmemAlign);
  t.buf_offset = t.t_offset + round_up(t_tile, kSmemAlign);
  t.smem_bytes = t.buf_offset + stages * slot;
  return t;
}

// Three slots when they fit (two slices in flight while one is used), else
// two; nullopt when not even two fit.
std::optional<TensorCoreTiling> fit_tensor_core(const ProblemDesc& p) {
  for (int stages : {3, 2}) {
    const TensorCoreTiling t = tile_tensor_core(p, stages);
    if (t.smem_bytes <= p.max_smem) {
      return t;
    }
  }
  return std::nullopt;
}

SplitKTiling tile_split_k(const ProblemDesc& p) {
  SplitKTiling s;
  s.rank_groups = ceil_div(p.r, kSkRankRowsPerBlock);
  s.row_groups = ceil_div(p.M, kSkRows);
  // About two shrink blocks per SM; each split reads a chunk of k that is
  // long enough to amortise loading its slice of x.
  const int64_t target = 2 * static_cast<int64_t>(std::max(p.num_sms, 1));
  const int64_t max_chunk = p.acc_bytes == 8 ? 256 : 512; // x slice <= 32 KB
  const int64_t want_splits =
      std::max<int64_t>(1, ceil_div(target, s.rank_groups * s.row_groups));
  int64_t chunk = round_up(ceil_div(p.k, want_splits), 32);
  chunk = std::max(chunk, std::min<int64_t>(128, round_up(p.k, 32)));
  s.k_chunk = std::min(chunk, max_chunk);
  s.splits = ceil_div(p.k, s.k_chunk);
  s.shrink_smem = kSkRows * s.k_chunk * p.acc_bytes;
  int lanes = 1;
  while (lanes < 32 && lanes < p.r) {
    lanes *= 2;
  }
  s.lanes_per_col = lanes;
  const int64_t col_blocks =
      std::max<int64_t>(1, std::max(p.num_sms, 1) / s.row_groups);
  s.expand_cols = std::max<int64_t>(32, round_up(ceil_div(p.d, col_blocks), 32));
  // At least one block: it also writes t when d == 0.
  s.expand_blocks = std::max<int64_t>(1, ceil_div(p.d, s.expand_cols));
  s.expand_smem = kSkRows * p.r * p.acc_bytes;
  return s;
}

} // namespace

const char* path_name(Path path) {
  switch (path) {
    case Path::kEmpty: return "empty";
    case Path::kBiasOnly: return "bias_only";
    case Path::kTensorCore: return "tensor_core";
    case Path::kSplitK: return "split_k";
    case Path::kCublas: return "cublas";
  }
  return "unknown";
}

std::optional<Path> path_from_name(const std::string& name) {
  if (name == "auto") return std::nullopt;
  if (name == "tensor_core") return Path::kTensorCore;
  if (name == "split_k") return Path::kSplitK;
  if (name == "cublas") return Path::kCublas;
  TORCH_CHECK_VALUE(
      false, "lowrank_linear: unknown CUDA path '", name,
      "'; expected auto, tensor_core, split_k or cublas");
  return std::nullopt;
}

Plan make_plan(const ProblemDesc& p, std::optional<Path> forced) {
  Plan plan;
  if (p.M == 0) {
    plan.path = Path::kEmpty;
    return plan;
  }
  if (p.r == 0 || p.k == 0) {
    plan.path = Path::kBiasOnly;
    return plan;
  }
  const std::optional<TensorCoreTiling> tc =
      p.half_type && p.r <= kTcMaxRank && p.sm_major >= 8 && p.kernels_built &&
          p.tensor_core_built
      ? fit_tensor_core(p)
      : std::nullopt;
  const bool tc_ok = tc.has_value();
  const bool sk_ok =
      p.kernels_built && p.r <= kSkMaxRank && ceil_div(p.M, kSkRows) <= kMaxGridYZ;
  if (forced.has_value()) {
    const bool ok = *forced == Path::kCublas ||
        (*forced == Path::kTensorCore && tc_ok) ||
        (*forced == Path::kSplitK && sk_ok);
    TORCH_CHECK_VALUE(
        ok, "lowrank_linear: the CUDA ", path_name(*forced),
        " path cannot run M=", p.M, ", k=", p.k, ", r=", p.r, ", d=", p.d,
        " for this dtype on compute capability ", p.sm_major, ".x with ",
        p.max_smem, " bytes of shared memory per block",
        !p.kernels_built       ? " (this build has no code for this GPU)"
        : !p.tensor_core_built ? " (this build has no sm_80+ code for this GPU)"
                               : "");
    plan.path = *forced;
  } else if (p.M <= kSmallM && sk_ok) {
    // Row tiles cannot fill the GPU: split the k-reduction instead.
    plan.path = Path::kSplitK;
  } else if (
      tc_ok &&
      ceil_div(p.M, kTcRows) >= std::max(1, p.num_sms / kTcMinBlocksDivisor)) {
    plan.path = Path::kTensorCore;
  } else {
    // float32 (cuBLAS honours allow_tf32), float64, r > 256, pre-Ampere, and
    // half types with too few row tiles to fill the GPU.
    plan.path = Path::kCublas;
  }
  if (plan.path == Path::kTensorCore) {
    plan.tc = *tc;
  } else if (plan.path == Path::kSplitK) {
    plan.sk = tile_split_k(p);
  }
  return plan;
}

std::vector<int64_t> plan_fields(const Plan& plan) {
  const TensorCoreTiling& t = plan.tc;
  const SplitKTiling& s = plan.sk;
  return {t.frags_per_warp, t.warps_n, t.rank_padded, t.threads, t.blocks,
          t.stages, t.ring_stage_elems, t.stage_offset, t.t_offset, t.buf_offset, t.smem_bytes,
          s.splits, s.k_chunk, s.rank_groups, s.row_groups, s.shrink_smem,
          s.expand_cols, s.expand_blocks, s.lanes_per_col, s.expand_smem};
}

} // namespace lowrank_ext::cuda
