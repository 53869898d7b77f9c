// Autograd kernels, registered in C++ so that a call which needs no gradient
// pays no Python cost, and one that does saves what its wanted gradients read
// (x, the factors, the (..., r) intermediate), never a dense W.
//
// The backward is written with ATen ops, so it runs on every device, is
// traced by torch.compile, and is itself differentiable; only small CPU
// problems outside any trace, where the ATen calls cost more than the
// arithmetic, take one-pass loops instead (cpu/small_backward.h).
#include "ops.h"
#include "cpu/few_rows.h"
#include "cpu/half_gemm.h"
#include "cpu/small_backward.h"

#include <cmath>
#include <functional>
#include <numeric>
#include <vector>

#include <ATen/SavedTensorHooks.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <c10/core/AutogradState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/library.h>

namespace lowrank_ext {
namespace {

// Whether `t` carries a forward-mode AD tangent (at any level). Tangents live
// in autograd meta, which a plain or an undefined tensor lacks. A view whose
// base got a tangent in place after the view was taken has none of its own,
// but ATen's ops read the base's: so does this.
bool has_forward_grad(const at::Tensor& t) {
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(
      t.unsafeGetTensorImpl()->autograd_meta());
  if (meta == nullptr) {
    return false;
  }
  if (meta->fw_grad_ != nullptr && !meta->fw_grad_->empty()) {
    return true;
  }
  if (!meta->is_view_) {
    return false;
  }
  const auto* view = static_cast<const torch::autograd::DifferentiableViewMeta*>(meta);
  return view->has_fw_view() && has_forward_grad(view->get_forward_view().base_);
}

} // namespace

bool any_forward_grad(std::initializer_list<const at::Tensor*> tensors) {
  // With forward grad mode off (inside a custom Function's forward, for one)
  // ATen's ops ignore tangents, and so does this. Otherwise a tensor without
  // autograd meta (no requires_grad, never a dual) costs one pointer test.
  // (Whether a forward-AD level is open at all, torch tells only from 2.14.)
  if (!c10::AutogradState::get_tls_state().get_fw_grad_mode()) {
    return false;
  }
  for (const at::Tensor* t : tensors) {
    if (t != nullptr && has_forward_grad(*t)) {
      return true;
    }
  }
  return false;
}

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

// Whether the backward must run differentiable ATen ops on a t recomputed
// from x and A: where it is itself differentiated (grad mode on inside it,
// create_graph=True) or recorded by the JIT tracer, which sees ATen ops only
// (to it the saved t, computed below the tracer, is a constant, and the
// small backward's loops would leave empty outputs in the trace).
bool plain_ops_only() {
  return at::GradMode::is_enabled() || torch::jit::tracer::isTracing();
}

// An operand to save for backward: itself where a wanted gradient reads its
// values, else a stand-in on the meta device with its sizes, strides and
// dtype (the backward reads every operand's shape). As torch's composition
// keeps only what its gradients read, an operand changed in place after the
// forward (a residual x += layer(x)) then fails only a backward that reads
// it, and no unread operand is kept alive. Under any trace (fake tensors,
// dispatch modes, the JIT tracer), with saved-tensor hooks (save_on_cpu
// would copy a stand-in's data, which it has none of) and for sparse
// operands, everything is kept.
at::Tensor kept_for_backward(const at::Tensor& t, bool read) {
  if (read || !t.defined() || t.layout() != at::kStrided || at::isTensorSubclassLike(t) ||
      torch::jit::tracer::isTracing() || at::SavedTensorDefaultHooks::get_hooks().has_value()) {
    return t;
  }
  return at::empty_strided(t.sizes(), t.strides(), t.options().device(at::kMeta));
}

// {x, A, B, t} as saved (as lowrank_ext/_library.py, _kept_operands): gx
// reads A and B (through gt = gy·B), gA reads x and B, gB reads t, and a
// differentiated backward recomputes t from x and A where a gradient can
// flow through it to them. `x_read_elsewhere`: x is read for another
// gradient (lora_linear's gW).
std::vector<at::Tensor> kept_operands(
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t,
    bool x_read_elsewhere) {
  const bool grad_x = x.requires_grad();
  const bool grad_A = A.requires_grad();
  const bool grad_B = B.requires_grad();
  const bool through_t = grad_B && (grad_x || grad_A);
  return {kept_for_backward(x, grad_A || through_t || x_read_elsewhere),
          kept_for_backward(A, grad_x || through_t), kept_for_backward(B, grad_x || grad_A),
          kept_for_backward(t, grad_B)};
}

// The C++ autograd kernels run no forward-mode formula: a tangent reaching
// them would be dropped without a word. The Python wrapper routes such a call
// to an autograd.Function with one (lowrank_ext/_functorch.py).
void check_no_forward_grad(
    const char* op, std::initializer_list<const at::Tensor*> tensors) {
  TORCH_CHECK(
      !any_forward_grad(tensors), op,
      ": forward-mode AD (an argument with a tangent, such as a dual tensor) is not "
      "supported by torch.ops.lowrank_ext.", op, ", which would drop the tangent; call "
      "lowrank_ext.", op, " (the Python function), which supports it");
}

// functorch cannot see through the C++ autograd kernels (torch refuses a C++
// autograd::Function under its transforms, in words about torch's internals);
// the Python function routes such calls to a form it can see through
// (lowrank_ext/_functorch.py). The fallback's kernels and the
// _with_intermediate forms refuse in the same words (lowrank_ext/_library.py).
// functorch includes its front-mode key in the thread's dispatch keys exactly
// while a transform is active (module.cpp tests the same); the ops' own
// routes under a transform reach these kernels only below it.
void check_no_functorch_transform(const char* op) {
  TORCH_CHECK(
      !c10::impl::tls_is_dispatch_key_included(
          c10::DispatchKey::FuncTorchDynamicLayerFrontMode),
      op, ": torch.ops.lowrank_ext.", op,
      " cannot be differentiated under a torch.func transform (grad, vjp, jacrev, ...), "
      "which cannot see through its autograd kernel; call lowrank_ext.", op,
      " (the Python function), which supports them");
}

// The saved intermediate t = x·Aᵀ was computed below autograd, so it carries
// no graph. A backward that is itself differentiated (create_graph=True, grad
// mode on inside backward) recomputes it with ATen ops so that gradients flow
// through t to x and A, and so does one the JIT tracer records (plain_ops_only);
// a plain backward uses the saved one.
at::Tensor intermediate_for_backward(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& t) {
  // (x and A are stand-ins, kept_for_backward, where no gradient of theirs
  // is wanted: t is then a constant of any graph.)
  const bool stand_ins = (x.is_meta() || A.is_meta()) && !t.is_meta();
  if (!plain_ops_only() || stand_ins) {
    return t;
  }
  // Beside a sparse x a sparse A is made dense, as the forward forms t
  // (lowrank_ext/_fallback.py, _factor_beside): a product of two sparse
  // matrices is sparse, and t is reshaped.
  const bool both_sparse = x.layout() != at::kStrided && A.layout() != at::kStrided;
  return at::matmul(x, (both_sparse ? A.to_dense() : A).t());
}

// The backward reads sizes as SymInts: under torch.compile they may be
// symbolic (dynamic shapes), and reading them as integers would specialise
// the graph to one batch size. Comparing a SymInt with a threshold guards on
// the outcome only, so a compiled graph serves every size on the same side of
// each threshold; on real tensors the SymInts are plain integers.

// Rows of x viewed as a matrix: the product of its leading dims (reshape's -1
// is ambiguous once k, r or d is zero).
c10::SymInt rows_of(const at::Tensor& x) {
  const c10::SymIntArrayRef sizes = x.sym_sizes();
  return std::accumulate(
      sizes.begin(), sizes.end() - 1, c10::SymInt(1), std::multiplies<c10::SymInt>());
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
// differentiable ops, nor under the JIT tracer).
bool use_weight_grad_kernel(const at::Tensor& gy2) {
  return gy2.device().is_cpu() && gy2.scalar_type() == at::kFloat &&
      !plain_ops_only();
}

// a·b where b may be a sparse x or factor (the ops take COO, CSR and CSC).
// ATen's CPU products with a sparse CSR/CSC second operand have no float16 or
// bfloat16 kernel (MKL's addmm): a half-type sparse b is multiplied in
// float32, as the forward computes, and the product rounded once.
at::Tensor matrix_product(const at::Tensor& a, const at::Tensor& b) {
  if (b.layout() == at::kStrided || !c10::isReducedFloatingType(b.scalar_type())) {
    return a.mm(b);
  }
  return a.to(at::kFloat).mm(b.to(at::kFloat)).to(a.scalar_type());
}

// c + a·b, in c: addmm takes no sparse second operand.
at::Tensor add_product(at::Tensor c, const at::Tensor& a, const at::Tensor& b) {
  return b.layout() == at::kStrided ? c.addmm_(a, b) : c.add_(matrix_product(a, b));
}

// aᵀ·b: the kernel above where it applies, ATen's mm otherwise.
at::Tensor transposed_product(const at::Tensor& a, const at::Tensor& b, bool kernel) {
  // The kernel reads strided operands; a sparse x or factor goes through ATen.
  return kernel && b.layout() == at::kStrided ? weight_grad_op(a, b)
                                              : matrix_product(a.t(), b);
}

// x as (M, k) rows for a weight gradient. A sparse x, which the ops take, is
// 2-D already and has no reshape (its weight gradients failed).
at::Tensor rows_matrix(const at::Tensor& x, const c10::SymInt& M, const c10::SymInt& k) {
  return x.layout() == at::kStrided ? x.reshape_symint({M, k}) : x;
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
      !plain_ops_only() && gy2.sym_size(0) >= kFoldBiasGradMinRows;
}

// Half types where ATen's products in them are slow (cpu/half_gemm.h): the
// backward runs on float32 copies of the operands it reads and rounds each
// gradient to the input dtype once. Not for a backward of fewer multiply-adds than
// kWidenMinMacs, where the up to nine conversions cost more than they save
// (the seed's 1 × 10 × 2 × 10 step took 70 µs widened against 69 for the
// composition; lowrank_linear's backward runs the small loops there), nor
// while building a graph for double backward, which needs the operands
// themselves.
constexpr int64_t kWidenMinMacs = 1 << 15;

bool widen_half_backward(const at::Tensor& gy, const c10::SymInt& macs) {
  return half_gemm_is_slow(gy) && !plain_ops_only() && macs >= kWidenMinMacs;
}

// `t` in float32 when `needed`, else `t` itself (whose values are not read).
at::Tensor widened(const at::Tensor& t, bool needed) {
  return needed && t.defined() ? t.to(at::kFloat) : t;
}

// use_few_rows_backward (cpu/few_rows.h), whose row thresholds are not
// visible here to guard on: a graph compiled for a symbolic row count takes
// ATen's product, right at any count, rather than specialise to one.
bool few_rows_backward(const at::Tensor& gy, const c10::SymInt& rows) {
  const std::optional<int64_t> n = rows.maybe_as_int();
  return n.has_value() && use_few_rows_backward(gy, *n);
}

// The backward computes in the dtypes the forward saved. Run inside an
// autocast region (backward() called under torch.autocast, or AOTAutograd
// tracing it under the caller's autocast), ATen's products would be cast to
// the autocast dtype one by one next to operands that are not: the backward
// of a float32 call made in an autocast(enabled=False) island failed with
// "_weight_grad: a is bfloat16 but b is float32". The fallback's backward
// does the same (lowrank_ext/_library.py, _outside_autocast).
struct OutsideAutocast {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

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
  // needs_input_grad only counts tensor inputs: a missing bias has no slot.
  const bool need_bias = bias_given(ctx) && ctx->needs_input_grad(3);
  if (use_small_lowrank_backward(gy, x, A, B, t)) {
    const int64_t M = rows_of(x).expect_int();
    const int64_t r = A.size(0);
    auto grads = small_lowrank_backward_cpu(
        gy.reshape({M, B.size(0)}), rows_matrix(x, M, A.size(1)), A, B, t.reshape({M, r}),
        ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
        need_bias);
    if (grads[0].defined()) {
      grads[0] = grads[0].view(x.sizes());
    }
    return {grads[0], grads[1], grads[2], grads[3]};
  }
  if (widen_half_backward(gy, rows_of(x) * A.sym_size(0) * (A.sym_size(1) + B.sym_size(0)))) {
    // x is read only for gA; t is saved, so it is never recomputed here.
    return narrowed_to(lowrank_backward(
        ctx, gy.to(at::kFloat), widened(x, ctx->needs_input_grad(1)), A.to(at::kFloat),
        B.to(at::kFloat), widened(t, true)), gy.scalar_type());
  }
  const c10::SymInt k = A.sym_size(1);
  const c10::SymInt r = A.sym_size(0);
  const c10::SymInt d = B.sym_size(0);
  const c10::SymInt M = rows_of(x);
  const at::Tensor gy2 = gy.reshape_symint({M, d});
  at::Tensor gx, gA, gB, gbias;
  const bool need_x = ctx->needs_input_grad(0);
  const bool need_A = ctx->needs_input_grad(1);
  const bool need_B = ctx->needs_input_grad(2);
  const bool kernel = use_weight_grad_kernel(gy2);
  const bool kernel_gx_gA = kernel && M >= kWeightGradMinRows;
  if (gy2.scalar_type() == at::kHalf && (need_x || need_A)) {
    // float16: gt = gy·B is formed in float32 and gx = gt·A, gA = gtᵀ·x are
    // rounded once from it, as the fallback does: gt rounded to float16 is
    // inf past 65504, where the gradients themselves can be representable.
    // (bfloat16 has float32's range: rounding its gt costs digits, not the
    // range, and widening gy and x would cost more than the products.)
    const at::Tensor gt = gy2.to(at::kFloat).mm(B.to(at::kFloat)); // (M, r)
    const bool kernel32 = use_weight_grad_kernel(gt) && M >= kWeightGradMinRows;
    if (need_x) {
      gx = transposed_product(gt.t(), A.to(at::kFloat), kernel32)
               .to(at::kHalf)
               .reshape_symint(x.sym_sizes());
    }
    if (need_A) {
      gA = transposed_product(gt, rows_matrix(x, M, k).to(at::kFloat), kernel32)
               .to(at::kHalf);
    }
  } else if (need_x && gy.device().is_cpu() && !plain_ops_only() &&
      M >= kFusedBackwardMinRows) {
    // gx = (gy·B)·A is this op again with the factors' roles swapped
    // (A' = Bᵀ, B' = Aᵀ): one fused pass whose intermediate is gt = gy·B.
    // Not used when building a graph for double backward, which needs the
    // differentiable mm path below.
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx2, gt] = lowrank_linear_with_intermediate_op(gy2, B.t(), A.t(), std::nullopt);
    gx = gx2.reshape_symint(x.sym_sizes());
    if (need_A) {
      gA = transposed_product(gt, rows_matrix(x, M, k), kernel_gx_gA);
    }
  } else if (need_x || need_A) {
    const at::Tensor gt = matrix_product(gy2, B); // (M, r)
    if (need_x) {
      gx = transposed_product(gt.t(), A, kernel_gx_gA).reshape_symint(x.sym_sizes());
    }
    if (need_A) {
      gA = transposed_product(gt, rows_matrix(x, M, k), kernel_gx_gA);
    }
  }
  if (need_B && need_bias && fold_bias_grad(gy2)) {
    // [gB | gbias] = gyᵀ·[t | 1]: one GEMM reads gy for both. For bfloat16
    // at 2048 × 4096 that saves 0.5 of the 1.3 ms gy.sum(0) takes alone.
    const at::Tensor t2 = t.reshape_symint({M, r});
    const at::Tensor both =
        gy2.t().mm(at::cat({t2, at::ones_symint({M, 1}, t2.options())}, 1));
    return {gx, gA, both.narrow_symint(1, 0, r), both.select_symint(1, r).contiguous()};
  }
  if (need_B) {
    const at::Tensor t2 = intermediate_for_backward(x, A, t).reshape_symint({M, r});
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
    ctx->save_for_backward(kept_operands(x, A, B, t, false));
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const OutsideAutocast outside_autocast;
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
  check_no_forward_grad("lowrank_linear", {&x, &A, &B, &bias_t});
  if (!any_requires_grad({&x, &A, &B, &bias_t})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lowrank_linear_op(x, A, B, bias);
  }
  check_no_functorch_transform("lowrank_linear");
  return LowRankLinearFunction::apply(x, A, B, bias);
}

// scale·v, or v itself for a scale of 1.
at::Tensor times(const at::Tensor& v, double scale) {
  return scale == 1.0 ? v : v.mul(scale);
}

// Gradients of lora_linear, given gy = dL/dy: {gx, gW, gA, gB, gbias, none}.
// The low-rank part's gradients are those of lowrank_linear for scale·gy;
// W and bias get the dense gradients of gy.
variable_list lora_backward(
    AutogradContext* ctx,
    const at::Tensor& gy,
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t,
    double scale) {
  // Sizes from A and B: W is saved only where x's gradient is wanted.
  const c10::SymInt k = A.sym_size(1);
  const c10::SymInt r = A.sym_size(0);
  const c10::SymInt d = B.sym_size(0);
  // Here the float32 copy of the dense W must be repaid as well.
  if (widen_half_backward(gy, rows_of(x) * k * (r + d)) &&
      rows_of(x) >= kWidenDenseMinRows) {
    // W is read only for gx, x only for gA and gW.
    const bool need_x = ctx->needs_input_grad(0);
    const bool read_x = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    return narrowed_to(lora_backward(
        ctx, gy.to(at::kFloat), widened(x, read_x), widened(W, need_x), A.to(at::kFloat),
        B.to(at::kFloat), widened(t, true), scale), gy.scalar_type());
  }
  const c10::SymInt M = rows_of(x);
  const at::Tensor gy2 = gy.reshape_symint({M, d});
  // float16: the adapter's products (gt = scale·gy·B and gB = scale·gyᵀ·t)
  // are formed from gy in float32 and rounded once: in float16, gy·B or gyᵀ·t
  // can overflow where the gradients are representable, and scale·gy (as
  // peft's composition forms it) loses digits to subnormals, or underflows to
  // zero, for a small scale and small gradients. bfloat16 has float32's range.
  // The adapter's products take scale·gy, as the composition forms them
  // ((scale·gy)·B, (scale·gy)ᵀ·t): scaling a product after it gave inf·0 =
  // NaN for a scale of 0 (a disabled adapter) and inf for a small one where
  // gy·B or gyᵀ·t overflowed, and scaling the small factor B or t instead
  // overflowed for a scale of 2 or lost digits to subnormals.
  const bool wide_gt = gy2.scalar_type() == at::kHalf;
  const bool need_x = ctx->needs_input_grad(0);
  const bool need_A = ctx->needs_input_grad(2);
  const bool need_B = ctx->needs_input_grad(3);
  // (Not made where only W's or the bias's gradient is wanted.)
  const bool adapter = need_x || need_A || need_B;
  const at::Tensor gy32 = wide_gt && adapter ? gy2.to(at::kFloat) : at::Tensor();
  const at::Tensor scaled_gy = adapter ? times(wide_gt ? gy32 : gy2, scale) : at::Tensor();
  at::Tensor gx, gW, gA, gB, gbias;
  if (need_x || need_A) {
    const at::Tensor gt = matrix_product(scaled_gy, wide_gt ? B.to(at::kFloat) : B); // (M, r)
    if (need_x && gy.device().is_cpu() && W.is_contiguous() && !plain_ops_only() &&
        few_rows_backward(gy, M)) {
      // Few rows: gy·W streams W in its own layout (cpu/few_rows.h), summed
      // with the adapter's gt·A in float32 and rounded once. Through the
      // dispatcher, so that fake tensors (torch.compile) reach a fake kernel.
      at::AutoDispatchBelowADInplaceOrView guard;
      gx = add_product(rows_times_weight_op(gy2.to(at::kFloat), W), gt.to(at::kFloat),
                       A.to(at::kFloat))
               .to(gy.scalar_type())
               .reshape_symint(x.sym_sizes());
    } else if (need_x) {
      // (In gt's dtype, then back: no copies unless gt was widened.) On the
      // CPU a float16 gy·W is formed in float32 too, so that one overflowing
      // where the adapter cancels it leaves gx finite, as the float32 product
      // of the few-rows branch and of a widened backward do; on devices the
      // half type's GEMM (its tensor cores) takes it, as peft's composition.
      const at::Tensor dense = wide_gt && gy.device().is_cpu()
          ? gy32.mm(W.to(at::kFloat))
          : gy2.mm(W).to(gt.scalar_type());
      gx = add_product(dense, gt, A.to(gt.scalar_type()))
               .to(gy.scalar_type())
               .reshape_symint(x.sym_sizes());
    }
    if (need_A) {
      gA = transposed_product(
               gt, rows_matrix(x, M, k).to(gt.scalar_type()),
               use_weight_grad_kernel(gt) && M >= kWeightGradMinRows)
               .to(A.scalar_type());
    }
  }
  if (ctx->needs_input_grad(1)) {
    gW = matrix_product(gy2.t(), rows_matrix(x, M, k));
  }
  if (need_B) {
    const at::Tensor t2 = intermediate_for_backward(x, A, t).reshape_symint({M, r});
    gB = transposed_product(scaled_gy, wide_gt ? t2.to(at::kFloat) : t2,
                            use_weight_grad_kernel(scaled_gy))
             .to(B.scalar_type());
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
    // W only where x's gradient may be wanted: a frozen base weight made
    // under torch.inference_mode() cannot be saved for backward, and the
    // adapter's gradients never read it. The others as lowrank_linear keeps
    // them, and x also for gW.
    std::vector<at::Tensor> saved = kept_operands(x, A, B, t, W.requires_grad());
    saved.insert(saved.begin() + 1, x.requires_grad() ? W : at::Tensor());
    ctx->save_for_backward(saved);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const OutsideAutocast outside_autocast;
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
  check_no_forward_grad("lora_linear", {&x, &W, &A, &B, &bias_t});
  if (!any_requires_grad({&x, &W, &A, &B, &bias_t})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lora_linear_op(x, W, A, B, bias, scale);
  }
  check_no_functorch_transform("lora_linear");
  return LoRALinearFunction::apply(x, W, A, B, bias, scale);
}

} // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, Autograd, m) {
  m.impl("lowrank_linear", &lowrank_linear_autograd);
  m.impl("lora_linear", &lora_linear_autograd);
}

} // namespace lowrank_ext
