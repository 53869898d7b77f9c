// The backward of lowrank_linear for problems a few thousand multiply-adds
// in size, in one pass on the CPU.
//
// There the products cost less than the ATen calls that form them: the
// seed's 1 × 10 × 2 × 10 training step spent about 20 of its 70 µs in the
// backward's four products, the bias sum and, for float16, six dtype
// conversions (float16 forms gt = gy·B in float32 for its range), where the
// arithmetic is 80 multiply-adds. Here one set of loops computes every
// wanted gradient, summing in float32 (float64 for float64) and rounding
// each gradient once; bfloat16 rounds gt = gy·B as well, as every other path
// of the backward does.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

namespace lowrank_ext {

// Largest M·r·(k + d) (half the backward's multiply-adds) taken by the small
// backward: the float16 backward is widened to float32 from there
// (autograd.cpp), and up to there the loops beat the ATen products in every
// dtype. Measured on 2 Zen 4 cores, a whole training step (forward and
// backward) at 1 × 10 × 2 × 10 took 46–50 µs against 66–69 (float32) and
// 77–88 (float16); at 4 × 256 × 16 × 256, M·r·(k + d) = 32768, 71 µs
// against 87 (float32), 91–98 against 100–111 (float16) and 67 against 184
// (bfloat16). The loops are single-threaded, so they also escape the
// threads' start-up, which a busy machine makes long (the ATen products
// took up to several ms a call while other processes ran).
constexpr int64_t kSmallBackwardMaxMacs = 1 << 15;

// Whether the backward of y = (x·Aᵀ)·Bᵀ + bias, given gy, runs in
// small_lowrank_backward_cpu: CPU tensors in memory (no sparse layouts, no
// tensor subclasses such as the fake tensors torch.compile traces with, no
// lazy negation), a floating dtype, grad mode off (a backward building a
// graph for double backward needs differentiable ops), no JIT trace
// recording, at most kSmallBackwardMaxMacs and at most twice that many
// elements in the operands (with r = 0 or M = 0 there are no products).
bool use_small_lowrank_backward(
    const at::Tensor& gy,
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t);

// {gx, gA, gB, gbias} for gy2 (M × d), x2 (M × k), A (r × k), B (d × r) and
// the forward's intermediate t2 = x2·Aᵀ (M × r), any strides; gx is (M × k).
// Each is undefined where its flag is false.
std::array<at::Tensor, 4> small_lowrank_backward_cpu(
    const at::Tensor& gy2,
    const at::Tensor& x2,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t2,
    bool need_x,
    bool need_A,
    bool need_B,
    bool need_bias);

} // namespace lowrank_ext
