// Runs the extension's CUDA kernels on the emulated GPU and checks every
// output against a float64 reference computed here from the same inputs.
//
// Reads one case per line on stdin:
//   path dtype M k r d ldx_extra misalign bias keep_t timing device
//     path      tensor_core | split_k (forced through make_plan, as
//               lowrank_linear_cuda_path does)
//     dtype     float16 | bfloat16 | float32 | float64
//     ldx_extra row stride of x minus k (non-contiguous rows)
//     misalign  1: every buffer starts one element past a 16-byte boundary
//     bias, keep_t  0 or 1
//     timing    issue | wait (when cp.async copies land, see CopyTiming)
//     device    h100 | a100 | small (the device the plan is made for)
//     [inputs]  optional: finite (default), or inf: x[0, 0] = +inf and every
//               input in [0, 1), so row 0 of t and y must be +inf, not NaN
// and prints one line per case: "PASS <case> ..." or "FAIL <case>: why".
// The exit status is the number of failed cases (capped at 100).
#include "emulated_kernels.h"

#include <cmath>
#include <iostream>
#include <random>
#include <sstream>
#include <string>

namespace {

using namespace lowrank_ext::cuda;

struct Case {
  std::string path, dtype, timing, device, inputs = "finite", line;
  int64_t M = 0, k = 0, r = 0, d = 0, ldx_extra = 0;
  bool misalign = false, bias = false, keep_t = false;
};

// Unit roundoff of a storage type, and of its accumulation type.
template <typename T> double unit_roundoff();
template <> double unit_roundoff<__half>() { return std::ldexp(1.0, -11); }
template <> double unit_roundoff<__nv_bfloat16>() { return std::ldexp(1.0, -8); }
template <> double unit_roundoff<float>() { return std::ldexp(1.0, -24); }
template <> double unit_roundoff<double>() { return std::ldexp(1.0, -53); }

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// A buffer of n elements that starts `offset` bytes into its allocation; the
// allocation ends exactly at the last element, so AddressSanitizer catches
// any access past it, and the bytes before the start are checked by hand.
template <typename T>
struct Buffer {
  Buffer(int64_t n, bool misalign)
      : offset(misalign ? sizeof(T) : 0),
        raw(std::make_unique<unsigned char[]>(offset + static_cast<size_t>(n) * sizeof(T))),
        size(n) {
    std::memset(raw.get(), 0xA5, offset);
  }
  T* data() { return reinterpret_cast<T*>(raw.get() + offset); }
  double get(int64_t i) const {
    return static_cast<double>(reinterpret_cast<const T*>(raw.get() + offset)[i]);
  }
  void poison() {
    std::memset(raw.get() + offset, 0xFF, static_cast<size_t>(size) * sizeof(T));
  }
  bool prefix_intact() const {
    for (size_t i = 0; i < offset; ++i) {
      if (raw[i] != 0xA5) return false;
    }
    return true;
  }
  size_t offset;
  std::unique_ptr<unsigned char[]> raw;
  int64_t size;
};

ProblemDesc describe(const Case& c, bool half_type, int acc_bytes) {
  ProblemDesc p;
  p.M = c.M, p.k = c.k, p.r = c.r, p.d = c.d;
  p.half_type = half_type;
  p.acc_bytes = acc_bytes;
  if (c.device == "h100") {
    p.sm_major = 9, p.num_sms = 132, p.max_smem = 227 * 1024;
  } else if (c.device == "a100") {
    p.sm_major = 8, p.num_sms = 108, p.max_smem = 163 * 1024;
  } else if (c.device == "small") {
    p.sm_major = 8, p.num_sms = 28, p.max_smem = 99 * 1024;
  } else {
    throw std::invalid_argument("unknown device " + c.device);
  }
  return p;
}

// One output element against its float64 reference: an infinite reference
// (inputs=inf) must be met exactly, a finite one within tol, and `worst`
// keeps the largest error / tolerance. Returns the failure line, or "".
std::string check_element(const Case& c, const char* name, int64_t i, int64_t j, double got,
                          double expected, double tol, double& worst) {
  const bool finite = std::isfinite(expected);
  const double err = finite ? std::fabs(got - expected) : 0.0;
  if (finite ? (!std::isfinite(got) || err > tol) : got != expected) {
    std::ostringstream why;
    why << "FAIL " << c.line << ": " << name << "[" << i << "," << j << "] = " << got
        << ", expected " << expected;
    return why.str();
  }
  worst = finite ? std::max(worst, err / tol) : worst;
  return "";
}

template <typename T>
void run_tensor_core(const TensorCoreTiling& tiling, const TensorCoreArgs& args) {
  const auto kernel = tensor_core_kernel_for<T>(tiling.frags_per_warp);
  if (kernel == nullptr) {
    throw std::runtime_error("no kernel for this many fragments per warp");
  }
  emu::launch(dim3(static_cast<unsigned>(tiling.blocks)), dim3(tiling.threads),
              tiling.smem_bytes, smem, [&] {
                kernel(args);
                emu::check_no_copies_in_flight();
              });
}

template <typename T>
void run_split_k(const SplitKTiling& s, const T* x, int64_t ldx, const T* A, const T* B,
                 const T* bias, T* y, T* t_out, int64_t M, int64_t k, int64_t r, int64_t d) {
  using acc_t = typename AccType<T>::type;
  // Uninitialised like at::empty's: every element read must have been written.
  std::vector<acc_t> partial(static_cast<size_t>(s.splits * M * r),
                             std::numeric_limits<acc_t>::quiet_NaN());
  emu::launch(dim3(static_cast<unsigned>(s.splits), static_cast<unsigned>(s.rank_groups),
                   static_cast<unsigned>(s.row_groups)),
              dim3(kSkThreads), s.shrink_smem, sk_smem, [&] {
                split_k_shrink_kernel<T, acc_t>(x, ldx, A, partial.data(), M, k, r, s.k_chunk);
              });
  emu::launch(dim3(static_cast<unsigned>(s.expand_blocks), static_cast<unsigned>(s.row_groups)),
              dim3(kSkThreads), s.expand_smem, sk_smem, [&] {
                split_k_expand_kernel<T, acc_t>(partial.data(), s.splits, B, bias, y, t_out, M,
                                                r, d, s.expand_cols, s.lanes_per_col);
              });
}

template <typename T>
std::string run_case(const Case& c) {
  constexpr bool half_type = sizeof(T) == 2;
  const int64_t M = c.M, k = c.k, r = c.r, d = c.d, ldx = c.k + c.ldx_extra;
  std::mt19937_64 rng(std::hash<std::string>{}(c.line));
  const bool with_inf = c.inputs == "inf";
  std::uniform_real_distribution<float> uniform(with_inf ? 0.0f : -1.0f, 1.0f);
  auto random_buffer = [&](int64_t n) {
    Buffer<T> b(n, c.misalign);
    for (int64_t i = 0; i < n; ++i) b.data()[i] = static_cast<T>(uniform(rng));
    return b;
  };
  Buffer<T> x = random_buffer(M == 0 ? 0 : (M - 1) * ldx + k);
  if (with_inf && M > 0 && k > 0) {
    x.data()[0] = static_cast<T>(std::numeric_limits<float>::infinity());
  }
  Buffer<T> A = random_buffer(r * k);
  Buffer<T> B = random_buffer(d * r);
  Buffer<T> bias = random_buffer(c.bias ? d : 0);
  Buffer<T> y(M * d, c.misalign), t(c.keep_t ? M * r : 0, c.misalign);
  y.poison(); // NaN: unwritten outputs show
  t.poison();

  const Plan plan = make_plan(describe(c, half_type, sizeof(typename AccType<T>::type)),
                              path_from_name(c.path));
  const T* bias_ptr = c.bias ? bias.data() : nullptr;
  T* t_ptr = c.keep_t ? t.data() : nullptr;
  if (plan.path == Path::kTensorCore) {
    if constexpr (half_type) {
      run_tensor_core<T>(plan.tc, make_tensor_core_args(plan.tc, x.data(), ldx, A.data(),
                                                        B.data(), bias_ptr, y.data(), t_ptr,
                                                        M, k, r, d));
    }
  } else if (plan.path == Path::kSplitK) {
    run_split_k<T>(plan.sk, x.data(), ldx, A.data(), B.data(), bias_ptr, y.data(), t_ptr, M, k,
                   r, d);
  } else {
    return std::string("FAIL ") + c.line + ": the plan chose " + path_name(plan.path);
  }

  // float64 reference from the stored (rounded) inputs. The tensor-core path
  // rounds t to the input dtype before the expand; split-K expands from the
  // float32 sums.
  const double u = unit_roundoff<T>(), u_acc = unit_roundoff<typename AccType<T>::type>();
  const bool t_rounded = plan.path == Path::kTensorCore;
  double worst_y = 0, worst_t = 0;
  std::vector<double> t_ref(r), t_mag(r);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      double s = 0, m = 0;
      for (int64_t p = 0; p < k; ++p) {
        s += x.get(i * ldx + p) * A.get(j * k + p);
        m += std::fabs(x.get(i * ldx + p) * A.get(j * k + p));
      }
      t_ref[j] = t_rounded ? static_cast<double>(static_cast<T>(s)) : s;
      t_mag[j] = m;
      if (c.keep_t) {
        const std::string failure =
            check_element(c, "t", i, j, t.get(i * r + j), static_cast<double>(static_cast<T>(s)),
                          (2 * u + 2 * k * u_acc) * m + 1e-300, worst_t);
        if (!failure.empty()) return failure;
      }
    }
    for (int64_t o = 0; o < d; ++o) {
      double s = c.bias ? bias.get(o) : 0.0, m = c.bias ? std::fabs(bias.get(o)) : 0.0;
      for (int64_t j = 0; j < r; ++j) {
        s += t_ref[j] * B.get(o * r + j);
        m += t_mag[j] * std::fabs(B.get(o * r + j));
      }
      const std::string failure =
          check_element(c, "y", i, o, y.get(i * d + o), s,
                        (4 * u + 2 * (k + r) * u_acc) * m + 1e-300, worst_y);
      if (!failure.empty()) return failure;
    }
  }
  if (!y.prefix_intact() || !t.prefix_intact()) {
    return "FAIL " + c.line + ": a write before the start of y or t";
  }
  std::ostringstream ok;
  ok << "PASS " << c.line << " (" << path_name(plan.path);
  if (plan.path == Path::kTensorCore) {
    ok << ", " << plan.tc.stages << " ring slots";
  }
  ok << ", worst error / tolerance: y "
     << worst_y << ", t " << worst_t << ")";
  return ok.str();
}

} // namespace

int main() {
  int failures = 0;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty() || line[0] == '#') continue;
    Case c;
    c.line = line;
    std::istringstream in(line);
    int misalign = 0, bias = 0, keep_t = 0;
    if (!(in >> c.path >> c.dtype >> c.M >> c.k >> c.r >> c.d >> c.ldx_extra >> misalign >>
          bias >> keep_t >> c.timing >> c.device)) {
      std::cout << "FAIL " << line << ": cannot parse the case" << std::endl;
      ++failures;
      continue;
    }
    c.misalign = misalign != 0, c.bias = bias != 0, c.keep_t = keep_t != 0;
    in >> c.inputs; // optional
    if (c.inputs != "finite" && c.inputs != "inf") {
      std::cout << "FAIL " << line << ": unknown inputs " << c.inputs << std::endl;
      ++failures;
      continue;
    }
    emu::copy_timing = c.timing == "wait" ? emu::CopyTiming::kAtWait : emu::CopyTiming::kAtIssue;
    std::string result;
    try {
      if (c.dtype == "float16") result = run_case<__half>(c);
      else if (c.dtype == "bfloat16") result = run_case<__nv_bfloat16>(c);
      else if (c.dtype == "float32") result = run_case<float>(c);
      else if (c.dtype == "float64") result = run_case<double>(c);
      else result = "FAIL " + line + ": unknown dtype";
    } catch (const std::exception& e) {
      result = "FAIL " + line + ": " + e.what();
    }
    if (result.rfind("PASS", 0) != 0) ++failures;
    std::cout << result << std::endl;
  }
  return failures > 100 ? 100 : failures;
}
