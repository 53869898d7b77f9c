#include "checks.h"

#include <cctype>
#include <cmath>

namespace lowrank_ext {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    case at::kComplexHalf: return "complex32";
    case at::kBool: return "bool";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: {
      // The rest are named as in Python once lowercased (UInt16 → uint16,
      // Float8_e4m3fn → float8_e4m3fn), so both backends say the same.
      std::string name = c10::toString(t);
      for (char& c : name) {
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      }
      return name;
    }
  }
}

void check_dtype_device(
    const char* op,
    const char* name,
    const at::Tensor& t,
    const at::Tensor& ref,
    const char* ref_name) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == ref.scalar_type(),
      op, ": ", name, " has dtype ", dtype_name(t.scalar_type()), " but ",
      ref_name, " has dtype ", dtype_name(ref.scalar_type()),
      "; all tensors must share one dtype");
  TORCH_CHECK(
      t.device() == ref.device(),
      op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
      ref.device(), "; all tensors must be on one device");
}

// Layouts named as Python prints them (torch.sparse_coo → sparse_coo).
static std::string layout_name(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "strided";
    case at::kSparse: return "sparse_coo";
    case at::kSparseCsr: return "sparse_csr";
    case at::kSparseCsc: return "sparse_csc";
    case at::kSparseBsr: return "sparse_bsr";
    case at::kSparseBsc: return "sparse_bsc";
    case at::kMkldnn: return "_mkldnn";
    case at::kJagged: return "jagged";
    default: return "unknown";
  }
}

// Undefined tensors (None passed to torch.ops for a Tensor argument) and
// layouts the kernels cannot take. x, A and B may be sparse COO, CSR or CSC
// (the products take them, forward and backward); the block layouts are
// refused, since ATen's CPU products take them on one side only (a BSR x ran
// forward and failed in its backward, a BSC x failed with addmm's message).
// The bias and W are added and expanded, which sparse tensors do not
// support, and no product takes mkldnn tensors.
static void check_tensor(
    const char* op, const char* name, const at::Tensor& t, bool dense) {
  TORCH_CHECK_TYPE(t.defined(), op, ": ", name, " must be a Tensor, got NoneType");
  const at::Layout layout = t.layout();
  const bool sparse_ok =
      layout == at::kSparse || layout == at::kSparseCsr || layout == at::kSparseCsc;
  const bool block = layout == at::kSparseBsr || layout == at::kSparseBsc;
  TORCH_CHECK_TYPE(
      layout == at::kStrided || (!dense && sparse_ok), op, ": ", name, " must be a ",
      dense ? "dense (strided)" : "strided or sparse COO, CSR or CSC",
      " tensor, got layout ", layout_name(layout),
      !dense && block ? "; convert it with .to_sparse() (COO)" : "");
  // A hybrid sparse tensor (dense dimensions below its sparse ones, as
  // to_sparse(1) makes) is no matrix of numbers to the products.
  TORCH_CHECK_VALUE(
      layout == at::kStrided || t.dense_dim() == 0, op, ": ", name,
      " must be a sparse matrix of numbers, got a hybrid sparse tensor with ", t.sparse_dim(),
      " sparse and ", t.dense_dim(), " dense dimension(s)");
}

static void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(
      x.dim() >= 1, op,
      ": x must have at least 1 dimension (..., k), got a 0-D tensor");
  // Sparse tensors have no reshape to (M, k) rows: the products take a matrix.
  TORCH_CHECK_VALUE(
      x.layout() == at::kStrided || x.dim() == 2, op,
      ": a sparse x must be 2-D (M, k), got shape ", x.sizes());
  TORCH_CHECK_TYPE(
      is_supported_float(x.scalar_type()), op,
      ": x must be float32, float64, float16 or bfloat16, got ",
      dtype_name(x.scalar_type()));
}

static void check_factors(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B) {
  TORCH_CHECK_VALUE(
      A.dim() == 2, op, ": A must be 2-D (r, k), got shape ", A.sizes());
  TORCH_CHECK_VALUE(
      B.dim() == 2, op, ": B must be 2-D (d, r), got shape ", B.sizes());
  TORCH_CHECK_VALUE(
      A.size(1) == x.size(-1), op, ": A has shape ", A.sizes(),
      " but x has k=", x.size(-1), " features in its last dimension (x shape ",
      x.sizes(), ")");
  TORCH_CHECK_VALUE(
      B.size(1) == A.size(0), op, ": B has shape ", B.sizes(),
      " but A has rank r=", A.size(0), " (A shape ", A.sizes(),
      "); B must be (d, r)");
}

static void check_bias(
    const char* op,
    const std::optional<at::Tensor>& bias,
    int64_t d) {
  if (!bias.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(
      bias->dim() == 1 && bias->size(0) == d, op,
      ": bias must have shape [d] = [", d, "], got shape ", bias->sizes());
}

void check_lowrank_linear_inputs(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias) {
  check_tensor(op, "x", x, false);
  check_tensor(op, "A", A, false);
  check_tensor(op, "B", B, false);
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, true);
  }
  check_x(op, x);
  check_dtype_device(op, "A", A, x, "x");
  check_dtype_device(op, "B", B, x, "x");
  if (bias.has_value()) {
    check_dtype_device(op, "bias", *bias, x, "x");
  }
  check_factors(op, x, A, B);
  check_bias(op, bias, B.size(0));
}

void check_lora_linear_inputs(
    const at::Tensor& x,
    const at::Tensor& W,
    const at::Tensor& A,
    const at::Tensor& B,
    const std::optional<at::Tensor>& bias,
    double scale) {
  const char* op = "lora_linear";
  check_tensor(op, "x", x, false);
  check_tensor(op, "W", W, true);
  check_tensor(op, "A", A, false);
  check_tensor(op, "B", B, false);
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, true);
  }
  check_x(op, x);
  check_dtype_device(op, "W", W, x, "x");
  check_dtype_device(op, "A", A, x, "x");
  check_dtype_device(op, "B", B, x, "x");
  if (bias.has_value()) {
    check_dtype_device(op, "bias", *bias, x, "x");
  }
  TORCH_CHECK_VALUE(
      W.dim() == 2, op, ": W must be 2-D (d, k), got shape ", W.sizes());
  TORCH_CHECK_VALUE(
      W.size(1) == x.size(-1), op, ": W has shape ", W.sizes(),
      " but x has k=", x.size(-1), " features in its last dimension (x shape ",
      x.sizes(), ")");
  check_factors(op, x, A, B);
  TORCH_CHECK_VALUE(
      B.size(0) == W.size(0), op, ": B has shape ", B.sizes(),
      " but W has d=", W.size(0), " output features (W shape ", W.sizes(),
      ")");
  check_bias(op, bias, W.size(0));
  // NaN printed as Python prints it, whatever its sign bit ("-nan" here).
  TORCH_CHECK_VALUE(
      std::isfinite(scale), op, ": scale must be finite, got ",
      std::isnan(scale) ? std::string("nan") : c10::str(scale));
}

} // namespace lowrank_ext
