// Autograd kernels, registered in C++ so that a call which needs no gradient
// pays no Python cost, and one that does saves x and the (..., r)
// intermediate, never a dense W.
//
// The backward is written with ATen ops, so it runs on every device, is
// traced by torch.compile, and is itself differentiable.
#include "ops.h"
#include "cpu/few_rows.h"
#include "cpu/half_gemm.h"

#include <cmath>

#include <torch/autograd.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool any_requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) {
    return false;
  }
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) {
      return true;
    }
  }
  return false;
}

// The saved intermediate t = x·Aᵀ was computed below autograd, so it carries
// no graph. A backward that is itself differentiated (create_graph=True, grad
// mode on inside backward) recomputes it with ATen ops so that gradients flow
// through t to x and A; a plain backward uses the saved one.
at::Tensor intermediate_for_backward(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& t) {
  return at::GradMode::is_enabled() ? at::matmul(x, A.t()) : t;
}

// Rows of x viewed as a matrix: the product of its leading dims (reshape's -1
// is ambiguous once k, r or d is zero).
int64_t rows_of(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

bool bias_given(AutogradContext* ctx) {
  return ctx->saved_data["has_bias"].toBool();
}

// Rows of gy from which the CPU backward fuses gx = (gy·B)·A. Below, the
// transposed copies of A and B the fused pass needs, and its larger
// intermediate traffic, cost more than gx = gt·A through the _weight_grad
// kernel (measured on 2 cores: the unfused step is 3–35 % faster from 64 to
// 1024 rows, the fused one 8 % faster at 2048).
constexpr int64_t kFusedBackwardMinRows = 1536;
// Rows from which gx = gt·A and gA = gtᵀ·x run the _weight_grad kernel; gB
// runs it at every row count. Measured at (M × 4096), r = 16 and 64: from 4
// rows the kernel beats ATen's mm on all three products, at a single row only
// on gB (6–14 µs against 16–32) and not on gx and gA (9–32 µs against 6–24).
constexpr int64_t kWeightGradMinRows = 4;

// The products of the backward contract over the batch rows (gA = gtᵀ·x,
// gB = gyᵀ·t) or over the small rank (gx = gt·A): on the CPU, in float32, they
// run the _weight_grad kernel, which reads transposed operands in place
// (never while building a graph for double backward, which needs
// differentiable ops).
bool use_weight_grad_kernel(const at::Tensor& gy2) {
  return gy2.device().is_cpu() && gy2.scalar_type() == at::kFloat &&
      !at::GradMode::is_enabled();
}

// aᵀ·b: the kernel above where it applies, ATen's mm otherwise.
at::Tensor transposed_product(const at::Tensor& a, const at::Tensor& b, bool kernel) {
  return kernel ? weight_grad_op(a, b) : a.t().mm(b);
}

// Rows from which a half-precision CPU backward folds the bias gradient into
// gB's GEMM. Measured at (M × 4096), r = 64: gy.sum(0) takes 0.06 ms at 256
// rows and 0.6 at 1024, where folding gains nothing, and 1.3–1.8 ms at 2048,
// where it saves 0.5–0.9 ms.
constexpr int64_t kFoldBiasGradMinRows = 1536;

// Whether gB and gbias come from one GEMM: half types on the CPU (ATen's mm,
// oneDNN), and never while building a graph for double backward.
bool fold_bias_grad(const at::Tensor& gy2) {
  return gy2.device().is_cpu() && at::isReducedFloatingType(gy2.scalar_type()) &&
      gy2.size(0) >= kFoldBiasGradMinRows && !at::GradMode::is_enabled();
}

// Half types where ATen's products in them are slow (cpu/half_gemm.h): the
// backward runs on float32 copies of the operands it reads and rounds each
// gradient to the input dtype once. Not for a backward of fewer multiply-adds than
// kWidenMinMacs, where the up to nine conversions cost more than they save
// (the seed's 1 × 10 × 2 × 10 step took 70 µs widened against 69 for the
// composition), nor while building a graph for double backward, which needs
// the operands themselves.
constexpr int64_t kWidenMinMacs = 1 << 15;

bool widen_half_backward(const at::Tensor& gy, int64_t macs) {
  return half_gemm_is_slow(gy) && macs >= kWidenMinMacs && !at::GradMode::is_enabled();
}

// `t` in float32 when `needed`, else `t` itself (whose values are not read).
at::Tensor widened(const at::Tensor& t, bool needed) {
  return needed && t.defined() ? t.to(at::kFloat) : t;
}

variable_list narrowed_to(variable_list grads, at::ScalarType dtype) {
  for (auto& g : grads) {
    if (g.defined()) {
      g = g.to(dtype);
    }
  }
  return grads;
}

// Gradients of y = t·Bᵀ + bias with t = x·Aᵀ, given gy = dL/dy.
// Returns {gx, gA, gB, gbias}; undefined where not needed.
variable_list lowrank_backward(
    AutogradContext* ctx,
    const at::Tensor& gy,
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t) {
  if (widen_half_backward(gy, rows_of(x) * A.size(0) * (A.size(1) + B.size(0)))) {
    // x is read only for gA; t is saved, so it is never recomputed here.
    return narrowed_to(lowrank_backward(
        ctx, gy.to(at::kFloat), widened(x, ctx->needs_input_grad(1)), A.to(at::kFloat),
        B.to(at::kFloat), widened(t, true)), gy.scalar_type());
  }
  const int64_t k = A.size(1);
  const int64_t r = A.size(0);
  const int64_t d = B.size(0);
  const int64_t M = rows_of(x);
  const at::Tensor gy2 = gy.reshape({M, d});
  at::Tensor gx, gA, gB, gbias;
  const bool need_x = ctx->needs_input_grad(0);
  const bool need_A = ctx->needs_input_grad(1);
  const bool need_B = ctx->needs_input_grad(2);
  // needs_input_grad only counts tensor inputs: a missing bias has no slot.
  const bool need_bias = bias_given(ctx) && ctx->needs_input_grad(3);
  const bool kernel = use_weight_grad_kernel(gy2);
  const bool kernel_gx_gA = kernel && M >= kWeightGradMinRows;
  if (need_x && gy.device().is_cpu() && gy2.size(0) >= kFusedBackwardMinRows &&
      !at::GradMode::is_enabled()) {
    // gx = (gy·B)·A is this op again with the factors' roles swapped
    // (A' = Bᵀ, B' = Aᵀ): one fused pass whose intermediate is gt = gy·B.
    // Not used when building a graph for double backward, which needs the
    // differentiable mm path below.
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx2, gt] = lowrank_linear_with_intermediate_op(gy2, B.t(), A.t(), std::nullopt);
    gx = gx2.reshape(x.sizes());
    if (need_A) {
      gA = transposed_product(gt, x.reshape({M, k}), kernel_gx_gA);
    }
  } else if (need_x || need_A) {
    const at::Tensor gt = gy2.mm(B); // (M, r)
    if (need_x) {
      gx = transposed_product(gt.t(), A, kernel_gx_gA).reshape(x.sizes());
    }
    if (need_A) {
      gA = transposed_product(gt, x.reshape({M, k}), kernel_gx_gA);
    }
  }
  if (need_B && need_bias && fold_bias_grad(gy2)) {
    // [gB | gbias] = gyᵀ·[t | 1]: one GEMM reads gy for both. For bfloat16
    // at 2048 × 4096 that saves 0.5 of the 1.3 ms gy.sum(0) takes alone.
    const at::Tensor t2 = t.reshape({M, r});
    const at::Tensor both = gy2.t().mm(at::cat({t2, at::ones({M, 1}, t2.options())}, 1));
    return {gx, gA, both.narrow(1, 0, r), both.select(1, r).contiguous()};
  }
  if (need_B) {
    const at::Tensor t2 = intermediate_for_backward(x, A, t).reshape({M, r});
    gB = transposed_product(gy2, t2, kernel);
  }
  if (need_bias) {
    gbias = gy2.sum(0);
  }
  return {gx, gA, gB, gbias};
}

class LowRankLinearFunction
    : public torch::autograd::Function<LowRankLinearFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& A,
      const at::Tensor& B,
      const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, t] = lowrank_linear_with_intermediate_op(x, A, B, bias);
    ctx->save_for_backward({x, A, B, t});
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return lowrank_backward(ctx, grads[0], saved[0], saved[1], saved[2], saved[3]);
  }
};

at::Tensor lowrank_linear_autograd(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  const at::Tensor bias_t = bias.value_or(at::Tensor());
  if (!any_requires_grad({&x, &A, &B, &bias_t})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lowrank_linear_op(x, A, B, bias);
  }
  return LowRankLinearFunction::apply(x, A, B, bias);
}

// Gradients of lora_linear, given gy = dL/dy: {gx, gW, gA, gB, gbias, none}.
// The low-rank part's gradients are those of lowrank_linear with B scaled;
// W and bias get the dense gradients.
variable_list lora_backward(
    AutogradContext* ctx,
    const at::Tensor& gy,
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t,
    double scale) {
  // Here the float32 copy of the dense W must be repaid as well.
  if (widen_half_backward(gy, rows_of(x) * W.size(1) * (A.size(0) + W.size(0))) &&
      rows_of(x) >= kWidenDenseMinRows) {
    // W is read only for gx, x only for gA and gW.
    const bool need_x = ctx->needs_input_grad(0);
    const bool read_x = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    return narrowed_to(lora_backward(
        ctx, gy.to(at::kFloat), widened(x, read_x), widened(W, need_x), A.to(at::kFloat),
        B.to(at::kFloat), widened(t, true), scale), gy.scalar_type());
  }
  const int64_t k = W.size(1);
  const int64_t r = A.size(0);
  const int64_t d = W.size(0);
  const int64_t M = rows_of(x);
  const at::Tensor gy2 = gy.reshape({M, d});
  // In float16 a scale below 1 goes on gy before the adapter's products, as
  // in peft's composition: gy·B or gyᵀ·t rounded to float16 before the scale
  // applies can overflow where the gradient is finite. (A scale of 1 or more
  // cannot save a product that overflows; bfloat16's range is float32's.)
  const bool scale_first = gy2.scalar_type() == at::kHalf && std::abs(scale) < 1.0;
  const at::Tensor gy_adapter = scale_first ? gy2 * scale : gy2;
  const double scale_after = scale_first ? 1.0 : scale;
  at::Tensor gx, gW, gA, gB, gbias;
  const bool need_x = ctx->needs_input_grad(0);
  const bool need_A = ctx->needs_input_grad(2);
  // The adapter's gradients have lowrank_linear's shapes: same kernel.
  const bool kernel = use_weight_grad_kernel(gy2);
  if (need_x || need_A) {
    const at::Tensor gt = gy_adapter.mm(B).mul_(scale_after); // (M, r)
    if (need_x && gy.device().is_cpu() && use_few_rows_backward(gy, M) && W.is_contiguous() &&
        !at::GradMode::is_enabled()) {
      // Few rows: gy·W streams W in its own layout (cpu/few_rows.h), summed
      // with the adapter's gt·A in float32 and rounded once. Through the
      // dispatcher, so that fake tensors (torch.compile) reach a fake kernel.
      at::AutoDispatchBelowADInplaceOrView guard;
      gx = rows_times_weight_op(gy2.to(at::kFloat), W)
               .addmm_(gt.to(at::kFloat), A.to(at::kFloat))
               .to(gy.scalar_type())
               .reshape(x.sizes());
    } else if (need_x) {
      gx = gy2.mm(W).addmm_(gt, A).reshape(x.sizes());
    }
    if (need_A) {
      gA = transposed_product(gt, x.reshape({M, k}), kernel && M >= kWeightGradMinRows);
    }
  }
  if (ctx->needs_input_grad(1)) {
    gW = gy2.t().mm(x.reshape({M, k}));
  }
  if (ctx->needs_input_grad(3)) {
    const at::Tensor t2 = intermediate_for_backward(x, A, t).reshape({M, r});
    gB = transposed_product(gy_adapter, t2, kernel).mul_(scale_after);
  }
  if (bias_given(ctx) && ctx->needs_input_grad(4)) {
    gbias = gy2.sum(0);
  }
  return {gx, gW, gA, gB, gbias, at::Tensor()};
}

// lora_linear: y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ.
class LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& x,
      const at::Tensor& W,
      const at::Tensor& A,
      const at::Tensor& B,
      const std::optional<at::Tensor>& bias,
      double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, t] = lora_linear_with_intermediate_op(x, W, A, B, bias, scale);
    ctx->save_for_backward({x, W, A, B, t});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return lora_backward(ctx, grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                         ctx->saved_data["scale"].toDouble());
  }
};

at::Tensor lora_linear_autograd(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  const at::Tensor bias_t = bias.value_or(at::Tensor());
  if (!any_requires_grad({&x, &W, &A, &B, &bias_t})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lora_linear_op(x, W, A, B, bias, scale);
  }
  return LoRALinearFunction::apply(x, W, A, B, bias, scale);
}

} // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, Autograd, m) {
  m.impl("lowrank_linear", &lowrank_linear_autograd);
  m.impl("lora_linear", &lora_linear_autograd);
}

} // namespace lowrank_ext
