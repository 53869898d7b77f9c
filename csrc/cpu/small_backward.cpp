// lowrank_linear's backward in one pass for small problems (small_backward.h).
#include "small_backward.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace lowrank_ext {

bool use_small_lowrank_backward(
    const at::Tensor& gy,
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t) {
  // A backward that is differentiated needs differentiable ops, and one the
  // JIT tracer records would be traced as empty outputs.
  if (at::GradMode::is_enabled() || torch::jit::tracer::isTracing() ||
      !at::isFloatingType(gy.scalar_type())) {
    return false;
  }
  for (const at::Tensor* p : {&gy, &x, &A, &B, &t}) {
    if (p->defined() && p->is_meta() && !gy.is_meta()) {
      continue; // a stand-in for an operand no wanted gradient reads
    }
    // Subclass-like first: a fake tensor (or one under a dispatch mode) must
    // reach ATen's ops, and its sizes may be symbolic.
    if (!p->defined() || at::isTensorSubclassLike(*p) || p->layout() != at::kStrided ||
        !p->device().is_cpu() || p->scalar_type() != gy.scalar_type() || p->is_neg() ||
        p->is_conj() || p->_is_zerotensor()) {
      return false;
    }
  }
  if (x.dim() < 1 || A.dim() != 2 || B.dim() != 2) {
    return false;
  }
  // In double: sizes whose product overflows int64 are not small.
  double rows = 1.0;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) {
    rows *= static_cast<double>(x.size(i));
  }
  const double r = static_cast<double>(A.size(0));
  const double k_plus_d = static_cast<double>(A.size(1)) + static_cast<double>(B.size(0));
  // The operands and gradients, (M + r)·(k + d) elements, are bounded too:
  // with no rows or no rank there are no products, but the loops would still
  // widen gy and x, zero and round the gradients, one thread at any size.
  // (For M, r ≥ 1 the first bound implies the second.)
  const double bound = static_cast<double>(kSmallBackwardMaxMacs);
  return rows * r * k_plus_d <= bound && (rows + r) * k_plus_d <= 2 * bound;
}

namespace {

// float16 elements from which ATen converts an operand or a gradient
// (vectorized, one call) instead of the scalar loops here: without F16C in
// this portable file c10::Half converts in software, a few ns an element,
// which at M = 1, k = d = 1024, r = 16 made the small float16 step slower
// than the composition. bfloat16 converts by a shift.
constexpr int64_t kScalarHalfConversions = 1024;

template <typename T>
bool convert_with_aten(int64_t n) {
  return std::is_same_v<T, c10::Half> && n > kScalarHalfConversions;
}

// m (rows × cols, any strides) as a row-major acc_t array: every element is
// then read many times, converted once, and the loops below run on
// contiguous rows the compiler can vectorize.
template <typename T, typename acc_t>
std::vector<acc_t> widened_rows(const at::Tensor& m) {
  const int64_t rows = m.size(0);
  const int64_t cols = m.size(1);
  std::vector<acc_t> out(static_cast<size_t>(rows * cols));
  if (convert_with_aten<T>(rows * cols)) {
    const at::Tensor wide = m.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::copy_n(wide.const_data_ptr<acc_t>(), rows * cols, out.begin());
    return out;
  }
  const int64_t row_stride = m.stride(0);
  const int64_t col_stride = m.stride(1);
  const T* data = m.const_data_ptr<T>();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      out[i * cols + j] = static_cast<acc_t>(data[i * row_stride + j * col_stride]);
    }
  }
  return out;
}

// sums rounded into a new tensor of the given sizes.
template <typename T, typename acc_t>
at::Tensor rounded(std::vector<acc_t>& sums, at::IntArrayRef sizes,
                   const at::TensorOptions& options) {
  if (convert_with_aten<T>(static_cast<int64_t>(sums.size()))) {
    // from_blob borrows sums; to() copies before it returns.
    return at::from_blob(sums.data(), sizes, options.dtype(c10::CppTypeToScalarType<acc_t>::value))
        .to(options.dtype());
  }
  at::Tensor out = at::empty(sizes, options);
  T* data = out.mutable_data_ptr<T>();
  for (size_t i = 0; i < sums.size(); ++i) {
    data[i] = static_cast<T>(sums[i]);
  }
  return out;
}

// Each of the backward's products as rows: for m < M and i < n, adds
// coef[m·n + i] times row src(m, i) of `in` to row dst(m, i) of `out`, rows
// of `len` elements (the inner loop runs along contiguous rows).
template <typename acc_t, typename DstRow, typename SrcRow>
void add_scaled_rows(
    std::vector<acc_t>& out,
    const std::vector<acc_t>& coef,
    const std::vector<acc_t>& in,
    int64_t M,
    int64_t n,
    int64_t len,
    DstRow dst,
    SrcRow src) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t c = coef[m * n + i];
      acc_t* to = out.data() + dst(m, i) * len;
      const acc_t* from = in.data() + src(m, i) * len;
      for (int64_t e = 0; e < len; ++e) {
        to[e] += c * from[e];
      }
    }
  }
}

template <typename T>
std::array<at::Tensor, 4> small_backward_typed(
    const at::Tensor& gy2,
    const at::Tensor& x2,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t2,
    bool need_x,
    bool need_A,
    bool need_B,
    bool need_bias) {
  using acc_t = at::opmath_type<T>;
  const int64_t M = gy2.size(0);
  const int64_t d = gy2.size(1);
  const int64_t k = x2.size(1);
  const int64_t r = A.size(0);
  const at::TensorOptions options = gy2.options();
  const std::vector<acc_t> gy = widened_rows<T, acc_t>(gy2);
  const auto zeros = [](int64_t n) { return std::vector<acc_t>(static_cast<size_t>(n), acc_t(0)); };
  const auto first = [](int64_t m, int64_t) { return m; };
  const auto second = [](int64_t, int64_t i) { return i; };
  std::array<at::Tensor, 4> grads;

  if (need_x || need_A) {
    // gt = gy·B (row m += gy[m, i]·B[i]). float16 keeps it in float32:
    // rounded, it would be inf past 65504 where the gradients themselves can
    // be representable. bfloat16 rounds it, as ATen's product in the larger
    // backward, the fallback and the torch.func route do, so that every path
    // gives the same gradients.
    std::vector<acc_t> gt = zeros(M * r);
    add_scaled_rows(gt, gy, widened_rows<T, acc_t>(B), M, d, r, first, second);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      for (acc_t& v : gt) {
        v = static_cast<acc_t>(static_cast<T>(v));
      }
    }
    if (need_x) { // gx = gt·A: row m += gt[m, j]·A[j]
      std::vector<acc_t> gx = zeros(M * k);
      add_scaled_rows(gx, gt, widened_rows<T, acc_t>(A), M, r, k, first, second);
      grads[0] = rounded<T>(gx, {M, k}, options);
    }
    if (need_A) { // gA = gtᵀ·x: row j += gt[m, j]·x[m]
      std::vector<acc_t> gA = zeros(r * k);
      add_scaled_rows(gA, gt, widened_rows<T, acc_t>(x2), M, r, k, second, first);
      grads[1] = rounded<T>(gA, {r, k}, options);
    }
  }
  if (need_B) { // gB = gyᵀ·t: row i += gy[m, i]·t[m]
    std::vector<acc_t> gB = zeros(d * r);
    add_scaled_rows(gB, gy, widened_rows<T, acc_t>(t2), M, d, r, second, first);
    grads[2] = rounded<T>(gB, {d, r}, options);
  }
  if (need_bias) { // gbias = Σ_m gy[m]
    std::vector<acc_t> gbias = zeros(d);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t i = 0; i < d; ++i) {
        gbias[i] += gy[m * d + i];
      }
    }
    grads[3] = rounded<T>(gbias, {d}, options);
  }
  return grads;
}

} // namespace

std::array<at::Tensor, 4> small_lowrank_backward_cpu(
    const at::Tensor& gy2,
    const at::Tensor& x2,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& t2,
    bool need_x,
    bool need_A,
    bool need_B,
    bool need_bias) {
  std::array<at::Tensor, 4> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gy2.scalar_type(), "small_lowrank_backward", [&] {
        grads = small_backward_typed<scalar_t>(
            gy2, x2, A, B, t2, need_x, need_A, need_B, need_bias);
      });
  return grads;
}

} // namespace lowrank_ext
