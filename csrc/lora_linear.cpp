// lora_linear: y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ, one kernel for every device.
//
// The dense product dominates, so it goes to the device's BLAS (MKL, cuBLAS)
// once; on the CPU at a few rows, where it is a stream over W, it goes to the
// shrink kernels instead (cpu/few_rows.h), with the adapter summed in float32.
// Otherwise, for float32/float64 the adapter's (M × r) intermediate is tiny
// beside it and its expand is accumulated straight into the same output
// buffer. Half types sum the dense product, the bias and scale times the
// adapter in float32 and round once, as the fallback does, so that an
// intermediate beyond float16's range does not overflow a representable
// result and a result that cancels keeps its digits. Where the dense product
// runs on float32 copies (cpu/half_gemm.h) everything does; where it runs in
// the half type, bias + scale·adapter, formed in float32, is the GEMM's C,
// which it adds to its float32 sums before rounding, and what rounding C to
// the half type lost is added back (lora_linear_half).
#include "checks.h"
#include "cpu/few_rows.h"
#include "cpu/half_gemm.h"
#include "cpu/split_adapter.h"

#include <ATen/DimVector.h>
#include <ATen/ScalarOps.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

namespace lowrank_ext {
namespace {

// Whether BLAS can take `scale` as the alpha of a product in `dtype`. ATen
// converts alpha to the dtype, raising (naming no argument) for a scale beyond
// float32's range, and BLAS skips the product for an alpha of 0 (a scale of
// 0, or below float32's smallest subnormal), which would drop a NaN or an
// infinity of the adapter that the composition x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ
// (peft's, and the fallback's) propagates. MKL also multiplies an operand by
// alpha before the product: with a scale of 1e30 and t = x·Aᵀ of 1e10 that
// overflowed to NaN where scale·(t·Bᵀ) is 0 or 2e30. Scales far from 1 (no
// LoRA scale is) therefore multiply the product instead, as the composition
// does.
bool scale_is_alpha(double scale, at::ScalarType dtype) {
  const double limit = dtype == at::kDouble ? 0x1p256 : 0x1p32;
  return std::abs(scale) <= limit && std::abs(scale) >= 1.0 / limit;
}

// The smallest non-zero |v| and the largest |v| of a float32 or float64 CPU
// tensor: bit patterns with the sign cleared, integer minima and maxima that
// the compiler vectorizes (float ones it may not, for NaN's sake). NaN's
// patterns lie above infinity's, so a NaN makes the largest NaN. The
// smallest non-zero pattern is the minimum of a - 1 (a zero wraps around to
// the largest value, out of the way; a branch per element would stop the
// vectorizer), plus 1; a tensor of zeros has none and gives +inf for it.
template <typename Bits, typename Real>
std::pair<double, double> abs_range_of(const at::Tensor& dense) {
  constexpr Bits kMagnitude = ~(Bits{1} << (8 * sizeof(Bits) - 1));
  const auto* p = static_cast<const Bits*>(dense.const_data_ptr());
  const int64_t n = dense.numel();
  Bits lo_minus_1 = ~Bits{0}, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Bits a = p[i] & kMagnitude;
    const Bits below = a - 1;
    lo_minus_1 = below < lo_minus_1 ? below : lo_minus_1;
    hi = a > hi ? a : hi;
  }
  const Bits lo = lo_minus_1 + 1; // 0 where every element is zero
  Real smallest, largest;
  std::memcpy(&smallest, &lo, sizeof(Real));
  std::memcpy(&largest, &hi, sizeof(Real));
  return {lo == 0 ? std::numeric_limits<double>::infinity() : double(smallest),
          double(largest)};
}

std::pair<double, double> abs_range_cpu(const at::Tensor& v) {
  const at::Tensor dense = v.is_non_overlapping_and_dense() ? v : v.contiguous();
  if (dense.scalar_type() == at::kDouble) {
    return abs_range_of<uint64_t, double>(dense);
  }
  TORCH_CHECK(dense.scalar_type() == at::kFloat, "abs_range_cpu: expected float32 or float64");
  return abs_range_of<uint32_t, float>(dense);
}

// Whether y += scale·t·Bt may pass scale to BLAS as alpha with the result of
// scale·(t·Bt), the composition's order. cuBLAS scales the sums. On the CPU,
// MKL multiplies an operand by alpha before the product, which changes the
// range: t of 3e38 and a scale of 2 gave inf where scale·(t·Bᵀ) is 0; a
// t·Bᵀ past float32's range and a scale of 0.5 gave a finite value where
// the composition gives inf; a subnormal t times a scale of 1e-3 lost its
// digits (twice the exact result). So a scale other than 1 is alpha only
// where the scaled operands stay normal and no product, scaled or not, can
// leave the range: r·max|t|·max|Bt| below it. Both operands are small
// ((M × r) and (d × r)); the rest is multiplied as the composition does.
bool alpha_keeps_range(const at::Tensor& y, const at::Tensor& t, const at::Tensor& Bt,
                       double scale) {
  if (!scale_is_alpha(scale, y.scalar_type())) {
    return false;
  }
  if (!y.device().is_cpu() || scale == 1.0) {
    return true;
  }
  // Where the (M × d) product costs no more than reading t and Bt (a few
  // rows: decoding), it is multiplied as the composition does, unchecked.
  const int64_t M = t.size(0), r = t.size(1), d = Bt.size(1);
  if (M * d <= (M + d) * r) {
    return false;
  }
  const bool is_double = y.scalar_type() == at::kDouble;
  const double largest =
      is_double ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  const double smallest_normal =
      is_double ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  const double s = std::abs(scale);
  const auto [t_lo, t_hi] = abs_range_cpu(t);
  const auto [b_lo, b_hi] = abs_range_cpu(Bt);
  // (Each bound divided through, so that it cannot overflow itself; NaN
  // compares false and multiplies the product instead.)
  const double rank = static_cast<double>(std::max<int64_t>(r, 1));
  const double bound = largest / std::max(1.0, s) / rank;
  return t_lo * s >= smallest_normal && b_lo * s >= smallest_normal &&
      (t_hi == 0.0 || b_hi <= bound / t_hi) && t_hi <= bound && b_hi <= bound;
}

// y += scale·t·Bt. A scale that cannot be alpha (rare) multiplies the product
// instead, as a wrapped number as Python passes one: in y's dtype, as the
// fallback's scale * (t·Bt) does (inf beyond float32's range, 0·NaN = NaN).
void add_scaled_adapter(at::Tensor& y, const at::Tensor& t, const at::Tensor& Bt, double scale) {
  if (alpha_keeps_range(y, t, Bt, scale)) {
    y.addmm_(t, Bt, /*beta=*/1, /*alpha=*/scale);
  } else {
    y.add_(at::mm(t, Bt).mul_(at::native::wrapped_scalar_tensor(scale)));
  }
}

// y += scale·t·Bt where the adapter has a rank. An empty one (r = 0) adds
// nothing, except through a scale that is no alpha: the composition's
// scale·(x·Aᵀ)·Bᵀ still multiplies its zeros then, and inf·0 is NaN.
void add_adapter_if_any(at::Tensor& y, const at::Tensor& t, const at::Tensor& Bt, double scale) {
  if (t.size(1) > 0 || !scale_is_alpha(scale, y.scalar_type())) {
    add_scaled_adapter(y, t, Bt, scale);
  }
}

// bias + scale·t·Bt in t's dtype (float32), bias (in any dtype) optional.
at::Tensor bias_plus_scaled_adapter(
    const at::Tensor& t,
    const at::Tensor& Bt,
    const std::optional<at::Tensor>& bias,
    double scale) {
  if (bias.has_value()) {
    // A copy of its own, always: for one row, expand() and contiguous() hand
    // back the bias itself, which the adapter would then be added into (and
    // every later block of rows would start from that).
    at::Tensor c = bias->to(t.scalar_type())
                       .expand({t.size(0), Bt.size(1)})
                       .clone(at::MemoryFormat::Contiguous);
    add_scaled_adapter(c, t, Bt, scale);
    return c;
  }
  at::Tensor c = at::mm(t, Bt);
  return scale == 1.0 ? c : c.mul_(at::native::wrapped_scalar_tensor(scale));
}

// Half types with every product in float32 and one rounding, the fallback's
// arithmetic; x2 is x as an (M × k) matrix.
std::tuple<at::Tensor, at::Tensor> lora_linear_half_widened(
    const at::Tensor& x2,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  const at::Tensor x32 = x2.to(at::kFloat);
  const at::Tensor t32 = at::mm(x32, A.to(at::kFloat).t());
  const at::Tensor W32t = W.to(at::kFloat).t();
  // (x·Wᵀ + bias) + scale·t·Bᵀ, the fallback's order: near float32's range
  // another order overflows where this one does not, or the other way.
  at::Tensor y32 = bias.has_value() ? at::addmm(bias->to(at::kFloat), x32, W32t)
                                    : at::mm(x32, W32t);
  add_adapter_if_any(y32, t32, B.to(at::kFloat).t(), scale);
  return {y32.to(x2.scalar_type()), t32.to(x2.scalar_type())};
}

// Elements per block of rows in which lora_linear_half forms its float32
// operands on the CPU: a fresh (M × d) float32 buffer costs more in page
// faults than the products that fill it (47 ms against 9 in blocks of 64 rows
// at M = 2048, d = 4096 on one Zen 4 core). On CUDA, whose allocator caches
// memory and where a block costs launches, all rows form one block.
constexpr int64_t kAdapterBlockElems = int64_t{1} << 18;

// Half types, the dense product in the half type: its GEMM sums in float32
// and rounds once, and adds its C to those sums first, so
// c = bias + scale·t·Bᵀ formed in float32 goes in as C. C must be in the
// half type: the part of c that rounding drops (c_lo, exact in float32) is
// added to the output afterwards, so that where the output cancels c (the
// result below c) it keeps most of the digits one rounding of the float32
// sum gives: the GEMM's rounding and c_lo's (kept in the half type) cost a
// last bit unless the result is more than about 2^8 (bfloat16) or 2^11
// (float16) times smaller than c; the fallback rounds once whatever the
// cancellation. (So this path sums (bias + adapter) + x·Wᵀ where the others
// sum (x·Wᵀ + bias) + adapter: within a few units of float32's largest value
// one order can overflow where the other does not.) On the
// CPU t = x·Aᵀ stays in float32 too, as in the fallback and the few-rows
// branch; CUDA reads x once in the half type and rounds t, as its fused
// kernel and peft's composition do.
std::tuple<at::Tensor, at::Tensor> lora_linear_half(
    const at::Tensor& x2,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  const int64_t M = x2.size(0);
  const int64_t d = W.size(0);
  const bool cpu = x2.device().is_cpu();
  const at::Tensor xr = cpu && x2.stride(1) != 1 ? x2.contiguous() : x2;
  const at::Tensor Ac = cpu ? A.contiguous() : A;
  at::Tensor A32t; // on a CPU without the shrink kernels
  const at::Tensor B32 = B.to(at::kFloat).contiguous();
  const at::Tensor B32t = B32.t();
  const std::optional<at::Tensor> bias32 = bias.has_value()
      ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous())
      : std::nullopt;
  at::Tensor t = at::empty({M, A.size(0)}, x2.options());
  at::Tensor y = at::empty({M, d}, x2.options()); // C, then the output (in place)
  at::Tensor c_lo = at::empty({M, d}, x2.options());
  const int64_t rows =
      cpu ? std::max<int64_t>(1, kAdapterBlockElems / std::max<int64_t>({d, x2.size(1), 1}))
          : std::max<int64_t>(M, 1);
  for (int64_t i = 0; i < M; i += rows) {
    const int64_t n = std::min(rows, M - i);
    const at::Tensor x_block = xr.narrow(0, i, n);
    // On the CPU the shrink kernels (cpu/few_rows.h) read x and A in the
    // half type and sum in float32, or else float32 copies do.
    at::Tensor t32 =
        cpu ? few_rows_product_cpu(x_block, Ac) : at::mm(x_block, A.t()).to(at::kFloat);
    if (!t32.defined()) {
      A32t = A32t.defined() ? A32t : A.to(at::kFloat).t();
      t32 = at::mm(x_block.to(at::kFloat), A32t);
    }
    t.narrow(0, i, n).copy_(t32);
    at::Tensor c_hi = y.narrow(0, i, n);
    // The same two parts in one pass (cpu/split_adapter.h).
    const AdapterSplit split = cpu
        ? split_scaled_adapter_cpu(t32, B32, bias32, scale, c_hi, c_lo.narrow(0, i, n))
        : AdapterSplit::kNotRun;
    if (split == AdapterSplit::kOverflowed) {
      return lora_linear_half_widened(x2, W, A, B, bias, scale);
    }
    if (split == AdapterSplit::kDone) {
      continue;
    }
    at::Tensor c = bias_plus_scaled_adapter(t32, B32t, bias32, scale);
    c_hi.copy_(c);
    // c past the half type's range where it was finite: its rounding is ±inf
    // and the sum may not be. (Looked for on the CPU only: on CUDA it would
    // cost a device synchronisation.)
    if (cpu && at::logical_and(c_hi.isinf(), c.isfinite()).any().item<bool>()) {
      return lora_linear_half_widened(x2, W, A, B, bias, scale);
    }
    // 0 where c is ±inf (a scale past float32's range) or past float16's
    // range: not NaN, so that the output is the ±inf the sum gives.
    c_lo.narrow(0, i, n).copy_(c.sub_(c_hi).nan_to_num_(0.0, 0.0, 0.0));
  }
  y.addmm_(x2, W.t()).add_(c_lo);
  // A c past the range reran above; a sum within half a unit of float16's
  // largest value can still round to ±inf where the float32 sum rounds
  // once to a finite value. On the CPU, where looking costs one pass and no
  // device synchronisation, such a call reruns in float32. (The float32 sum
  // of float16 values is finite exactly when they all are: it cannot
  // overflow.)
  if (x2.scalar_type() == at::kHalf && cpu && !std::isfinite(y.sum(at::kFloat).item<float>())) {
    return lora_linear_half_widened(x2, W, A, B, bias, scale);
  }
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor> lora_linear_with_intermediate_kernel(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  check_lora_linear_inputs(x, W, A, B, bias, scale);
  const c10::OptionalDeviceGuard device_guard(x.device());
  const int64_t k = x.size(-1);
  const int64_t r = A.size(0);
  const int64_t d = W.size(0);
  at::DimVector lead(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t M = c10::multiply_integers(lead.begin(), lead.end());
  at::DimVector y_shape = lead, t_shape = lead;
  y_shape.push_back(d);
  t_shape.push_back(r);

  const at::Tensor x2 = x.reshape({M, k});
  if (x.device().is_cpu() && use_few_rows_dense(x, M) && W.is_contiguous()) {
    // Few rows: both products stream their weights through the shrink
    // kernels (cpu/few_rows.h), summed in float32 and rounded once.
    const at::Tensor xr = x2.stride(1) == 1 ? x2 : x2.contiguous();
    at::Tensor y32 = few_rows_product_cpu(xr, W);
    if (y32.defined()) {
      at::Tensor t32 = few_rows_product_cpu(xr, A.contiguous());
      if (!t32.defined()) {  // the kernels were turned off since (_cpu_kernel, another thread)
        t32 = at::mm(xr.to(at::kFloat), A.to(at::kFloat).t());
      }
      // The bias before the adapter, in the fallback's order (see
      // lora_linear_half_widened).
      if (bias.has_value()) {
        y32.add_(bias->to(at::kFloat));
      }
      add_adapter_if_any(y32, t32, B.t().to(at::kFloat), scale);
      return {y32.to(x.scalar_type()).view(y_shape), t32.to(x.scalar_type()).view(t_shape)};
    }
  }
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) {
    // No fast GEMM in this half type here (cpu/half_gemm.h): from
    // kWidenDenseMinRows the dense product's float32 copy of W pays off.
    auto [y2, t2] = half_gemm_is_slow(x) && M >= kWidenDenseMinRows
        ? lora_linear_half_widened(x2, W, A, B, bias, scale)
        : lora_linear_half(x2, W, A, B, bias, scale);
    return {y2.view(y_shape), t2.view(t_shape)};
  }
  at::Tensor y2 = bias.has_value() ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());
  const at::Tensor t2 = at::mm(x2, A.t());
  if (M > 0) {
    add_adapter_if_any(y2, t2, B.t(), scale);
  }
  return {y2.view(y_shape), t2.view(t_shape)};
}

at::Tensor lora_linear_kernel(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  return std::get<0>(lora_linear_with_intermediate_kernel(x, W, A, B, bias, scale));
}

} // namespace

// Registered per device so that backend_info() and the dispatcher agree on
// which devices run compiled code.
TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear_kernel);
  m.impl("lora_linear_with_intermediate", &lora_linear_with_intermediate_kernel);
}

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("lora_linear", &lora_linear_kernel);
  m.impl("lora_linear_with_intermediate", &lora_linear_with_intermediate_kernel);
}

} // namespace lowrank_ext
