// CUDA kernels of lowrank_linear: y = (x·Aᵀ)·Bᵀ + bias.
//
// make_plan (lowrank_plan.cpp) picks one of
//   * the fused tensor-core kernel (float16/bfloat16, r <= 256, sm_80+):
//     one launch, the intermediate never leaves the chip;
//   * split-K (M <= 16, every dtype): two launches, deterministic;
//   * two cuBLAS GEMMs (float32, where cuBLAS applies allow_tf32 itself;
//     float64; r > 256; GPUs older than sm_80; too few row tiles to fill
//     the GPU with the fused kernel).
// Everything runs on the current stream of x's device.
#include "../checks.h"
#include "../lowrank_operands.h"
#include "lowrank_plan.h"
#include "split_k.cuh"
#include "tensor_core_fused.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <vector>

namespace lowrank_ext::cuda {
namespace {

// Device attributes the plan depends on, read once per device. (Queried
// directly: the ATen device property cache pulls in the cuBLAS/cuSPARSE
// headers.)
struct DeviceInfo {
  int sm_major = 0, num_sms = 0, max_smem = 0;
  bool kernels_built = false, tensor_core_built = false;
};

DeviceInfo query_device(int device) {
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &info.sm_major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &info.num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &info.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // The fused kernel's body is compiled only for sm_80 and newer. A build
  // with no such code for this GPU (say TORCH_CUDA_ARCH_LIST="7.5+PTX" on an
  // sm_90 device, which JIT-compiles the compute_75 PTX) loads an empty
  // kernel: the plan must then not choose it. (The caller's device guard
  // makes `device` current.)
  cudaFuncAttributes attributes{};
  const cudaError_t status =
      cudaFuncGetAttributes(&attributes, tensor_core_fused_kernel<__half, 1>);
  // (Older drivers report a missing image as an invalid device function.)
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError(); // not sticky: clear it so later CUDA calls do not report it
    int minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(
        &minor, cudaDevAttrComputeCapabilityMinor, device));
    // Every kernel of the extension is missing, not just the fused one (the
    // default build's "8.0;9.0+PTX" on a V100 or T4, say). cuBLAS, which
    // needs none of them, still runs every problem: use it, and say once
    // per device how to get the extension's own kernels.
    TORCH_WARN("lowrank_ext: this build has no CUDA code for this GPU (sm_", info.sm_major,
               minor, "), so lowrank_linear runs there as two cuBLAS GEMMs; rebuild with "
               "TORCH_CUDA_ARCH_LIST=\"", info.sm_major, ".", minor,
               "\" for its own kernels");
    return info; // kernels_built and tensor_core_built stay false
  }
  C10_CUDA_CHECK(status);
  info.kernels_built = true;
  info.tensor_core_built = attributes.ptxVersion >= 80;
  return info;
}

const DeviceInfo& device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    it = cache.emplace(device, query_device(device)).first;
  }
  return it->second; // map nodes never move
}

// Dynamic shared memory above 48 KB must be opted into per kernel and
// device. The largest size granted so far is remembered, so that a launch
// makes the driver call only when it needs more than before.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) {
    return;
  }
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  int64_t& most = granted[{reinterpret_cast<const void*>(kernel), c10::cuda::current_device()}];
  if (bytes > most) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    most = bytes;
  }
}

template <typename T>
void run_tensor_core_typed(const TensorCoreTiling& tiling, const TensorCoreArgs& args) {
  const auto kernel = tensor_core_kernel_for<T>(tiling.frags_per_warp);
  TORCH_CHECK(kernel != nullptr, "lowrank_linear: no tensor-core kernel for ",
              tiling.frags_per_warp, " fragments per warp");
  allow_smem(kernel, tiling.smem_bytes);
  kernel<<<static_cast<unsigned>(tiling.blocks), tiling.threads, tiling.smem_bytes,
           c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_tensor_core(
    const TensorCoreTiling& tiling, const at::Tensor& x2, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& bias, at::Tensor& y, at::Tensor& t) {
  const TensorCoreArgs args = make_tensor_core_args(
      tiling, x2.const_data_ptr(), x2.stride(0), A.const_data_ptr(), B.const_data_ptr(),
      bias.defined() ? bias.const_data_ptr() : nullptr, y.mutable_data_ptr(),
      t.defined() ? t.mutable_data_ptr() : nullptr, x2.size(0), x2.size(1), A.size(0),
      B.size(0));
  if (x2.scalar_type() == at::kHalf) {
    run_tensor_core_typed<__half>(tiling, args);
  } else {
    run_tensor_core_typed<__nv_bfloat16>(tiling, args);
  }
}

void run_split_k(
    const SplitKTiling& tiling, const at::Tensor& x2, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& bias, at::Tensor& y, at::Tensor& t) {
  const int64_t M = x2.size(0), k = x2.size(1), r = A.size(0), d = B.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x2.scalar_type(), "lowrank_linear_split_k", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor partial = at::empty(
            {tiling.splits, M, r}, x2.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        const dim3 shrink_grid(
            static_cast<unsigned>(tiling.splits), static_cast<unsigned>(tiling.rank_groups),
            static_cast<unsigned>(tiling.row_groups));
        split_k_shrink_kernel<scalar_t, acc_t>
            <<<shrink_grid, kSkThreads, tiling.shrink_smem, stream>>>(
                x2.const_data_ptr<scalar_t>(), x2.stride(0), A.const_data_ptr<scalar_t>(),
                partial.mutable_data_ptr<acc_t>(), M, k, r,
                tiling.k_chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const dim3 expand_grid(
            static_cast<unsigned>(tiling.expand_blocks),
            static_cast<unsigned>(tiling.row_groups));
        split_k_expand_kernel<scalar_t, acc_t>
            <<<expand_grid, kSkThreads, tiling.expand_smem, stream>>>(
                partial.const_data_ptr<acc_t>(), tiling.splits, B.const_data_ptr<scalar_t>(),
                bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                y.mutable_data_ptr<scalar_t>(),
                t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr, M, r, d,
                tiling.expand_cols, tiling.lanes_per_col);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// Two GEMMs; cuBLAS accumulates half types in fp32 and honours allow_tf32.
void run_cublas(
    const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& bias, at::Tensor& y2, at::Tensor& t2) {
  const at::Tensor t = t2.defined() ? at::mm_out(t2, x2, A.t()) : at::mm(x2, A.t());
  if (bias.defined()) {
    at::addmm_out(y2, bias, t, B.t());
  } else {
    at::mm_out(y2, t, B.t());
  }
}

} // namespace

std::tuple<at::Tensor, at::Tensor> lowrank_linear_cuda_impl(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    bool keep_intermediate,
    std::optional<Path> forced) {
  // Errors name the public op, also when reached through the other entry points.
  const char* op = "lowrank_linear";
  check_lowrank_linear_inputs(op, x, A, B, bias);
  TORCH_CHECK(x.is_cuda(), op, ": CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());

  const LowRankOperands ops = prepare_lowrank_operands(x, A, B, bias, keep_intermediate);
  if (ops.done) {
    return {ops.y, ops.t};
  }
  const int64_t M = ops.M, k = ops.k, r = ops.r, d = ops.d;

  ProblemDesc desc;
  desc.M = M, desc.k = k, desc.r = r, desc.d = d;
  desc.half_type = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  desc.acc_bytes = x.scalar_type() == at::kDouble ? 8 : 4;
  const DeviceInfo& info = device_info(c10::cuda::current_device());
  desc.sm_major = info.sm_major;
  desc.kernels_built = info.kernels_built;
  desc.tensor_core_built = info.tensor_core_built;
  desc.num_sms = info.num_sms;
  desc.max_smem = info.max_smem;
  const Plan plan = make_plan(desc, forced);

  at::Tensor y2 = ops.y.view({M, d});
  at::Tensor t2 = keep_intermediate ? ops.t.view({M, r}) : at::Tensor();

  switch (plan.path) {
    case Path::kTensorCore:
      run_tensor_core(plan.tc, ops.x2, ops.A2, ops.B2, ops.bias2, y2, t2);
      break;
    case Path::kSplitK:
      run_split_k(plan.sk, ops.x2, ops.A2, ops.B2, ops.bias2, y2, t2);
      break;
    case Path::kCublas:
      run_cublas(ops.x2, ops.A2, ops.B2, ops.bias2, y2, t2);
      break;
    default:
      // Empty and bias-only problems were answered by prepare_lowrank_operands.
      TORCH_INTERNAL_ASSERT(false, "lowrank_linear: unexpected CUDA plan ", path_name(plan.path));
  }
  return {ops.y, ops.t};
}

namespace {

at::Tensor lowrank_linear_cuda(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  return std::get<0>(lowrank_linear_cuda_impl(x, A, B, bias, false, std::nullopt));
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_intermediate_cuda(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  return lowrank_linear_cuda_impl(x, A, B, bias, true, std::nullopt);
}

// For tests and tuning: one named path regardless of the heuristics ("auto"
// keeps them); without keep_intermediate the second output is undefined.
std::tuple<at::Tensor, at::Tensor> lowrank_linear_cuda_path(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    c10::string_view path,
    bool keep_intermediate) {
  return lowrank_linear_cuda_impl(
      x, A, B, bias, keep_intermediate, path_from_name(std::string(path)));
}

} // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("lowrank_linear", &lowrank_linear_cuda);
  m.impl("lowrank_linear_with_intermediate", &lowrank_linear_with_intermediate_cuda);
}

TORCH_LIBRARY_IMPL(lowrank_ext_internal, CUDA, m) {
  m.impl("lowrank_linear_cuda_path", &lowrank_linear_cuda_path);
}

} // namespace lowrank_ext::cuda
