// The Python module lowrank_ext._C. Loading it registers the compiled kernels
// (the TORCH_LIBRARY_IMPL blocks in the other files); it also offers
//
//  * build_info(): what this build contains;
//  * lowrank_linear / lora_linear: direct entry points to the dispatcher.
//    torch.ops costs microseconds per call in argument parsing, which is all
//    of the run time at small shapes; these take the arguments positionally,
//    check them, and call the same dispatcher op (so autograd, CPU and CUDA
//    kernels and profiling all still apply). They return NotImplemented when
//    an argument overrides __torch_function__ (or a mode is active), a
//    torch.func transform is active, the JIT tracer is recording, an
//    argument carries a forward-mode AD tangent or is nested, and the Python
//    wrapper then takes the torch.ops path (or, under a transform, an ONNX
//    export or forward-mode AD, its own; for a nested tensor, its error).
#include "ops.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/extension.h>

#include <cstring>
#include <string>

namespace lowrank_ext {
namespace {

// Work (multiply-adds) above which the GIL is released during the call, so
// other Python threads can run; below it the release costs more than it buys.
constexpr int64_t kReleaseGilFlops = 1 << 16;

// Unpacks a required tensor argument; sets a TypeError and returns false when
// it is not a tensor. `*overridden` is set when it overrides torch functions.
bool unpack_tensor(
    const char* op, const char* name, PyObject* obj, at::Tensor* out,
    bool* overridden) {
  if (!THPVariable_Check(obj)) {
    if (PyObject_HasAttrString(reinterpret_cast<PyObject*>(Py_TYPE(obj)),
                               "__torch_function__")) {
      // Not a tensor but standing for one (torch.fx's Proxy while
      // symbolic_trace runs): the Python wrapper hands it to torch.ops.
      *overridden = true;
      return true;
    }
    // type(obj).__name__, as the Python checks print it: tp_name carries a
    // module prefix for types defined in C ("numpy.ndarray").
    const char* full = Py_TYPE(obj)->tp_name;
    const char* dot = std::strrchr(full, '.');
    PyErr_Format(
        PyExc_TypeError, "%s: %s must be a Tensor, got %s", op, name,
        dot != nullptr ? dot + 1 : full);
    return false;
  }
  // Tensor and Parameter are handled here; a subclass may override
  // __torch_function__ and must go through torch.ops.
  *overridden = *overridden || !THPVariable_CheckExact(obj);
  *out = THPVariable_Unpack(obj);
  return true;
}

bool unpack_optional_tensor(
    const char* op, const char* name, PyObject* obj,
    std::optional<at::Tensor>* out, bool* overridden) {
  if (obj == Py_None) {
    *out = std::nullopt;
    return true;
  }
  at::Tensor t;
  if (!unpack_tensor(op, name, obj, &t, overridden)) {
    return false;
  }
  *out = std::move(t);
  return true;
}

// Under a torch.func transform the Python wrapper takes another route
// (lowrank_ext/_functorch.py): functorch cannot see through the C++ autograd
// kernel. functorch includes its front-mode key in the thread's dispatch
// keys exactly while a transform is active.
bool functorch_active() {
  return c10::impl::tls_is_dispatch_key_included(
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// Whether one of `tensors` (null for an absent bias) is a nested tensor.
bool any_nested(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t != nullptr && t->is_nested()) {
      return true;
    }
  }
  return false;
}

// Whether the call must be left to the Python wrapper: a tensor subclass or
// torch-function mode, a torch.func transform, the JIT tracer (the legacy
// ONNX exporter traces through it, and the wrapper records the pure-torch
// composition for that exporter), a forward-mode AD tangent on one of
// `tensors` (the C++ autograd kernel has no forward-mode formula; the
// wrapper's route does), or a nested tensor among them (the wrapper names
// it; the dispatcher would only say that no kernel takes it).
bool python_must_handle(bool overridden, std::initializer_list<const at::Tensor*> tensors) {
  return overridden || at::impl::torch_function_mode_enabled() || functorch_active() ||
      torch::jit::tracer::isTracing() || any_forward_grad(tensors) || any_nested(tensors);
}

PyObject* wrap_result(at::Tensor y) {
  return THPVariable_Wrap(std::move(y));
}

// lowrank_linear(x, A, B, bias)
PyObject* py_lowrank_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* op = "lowrank_linear";
  if (nargs != 4) {
    PyErr_Format(PyExc_TypeError, "%s: expected 4 arguments, got %zd", op, nargs);
    return nullptr;
  }
  at::Tensor x, A, B;
  std::optional<at::Tensor> bias;
  bool overridden = false;
  if (!unpack_tensor(op, "x", args[0], &x, &overridden) ||
      !unpack_tensor(op, "A", args[1], &A, &overridden) ||
      !unpack_tensor(op, "B", args[2], &B, &overridden) ||
      !unpack_optional_tensor(op, "bias", args[3], &bias, &overridden)) {
    return nullptr;
  }
  if (python_must_handle(overridden, {&x, &A, &B, bias ? &*bias : nullptr})) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  at::Tensor y;
  // A.dim() first: A.size(0) of a 0-D A would throw IndexError before the
  // op's own check says what is wrong.
  if (A.dim() != 2 || x.numel() * A.size(0) < kReleaseGilFlops) {
    y = lowrank_linear_op(x, A, B, bias);
  } else {
    pybind11::gil_scoped_release no_gil;
    y = lowrank_linear_op(x, A, B, bias);
  }
  return wrap_result(std::move(y));
  END_HANDLE_TH_ERRORS
}

// lora_linear(x, W, A, B, bias, scale)
PyObject* py_lora_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* op = "lora_linear";
  if (nargs != 6) {
    PyErr_Format(PyExc_TypeError, "%s: expected 6 arguments, got %zd", op, nargs);
    return nullptr;
  }
  at::Tensor x, W, A, B;
  std::optional<at::Tensor> bias;
  bool overridden = false;
  if (!unpack_tensor(op, "x", args[0], &x, &overridden) ||
      !unpack_tensor(op, "W", args[1], &W, &overridden) ||
      !unpack_tensor(op, "A", args[2], &A, &overridden) ||
      !unpack_tensor(op, "B", args[3], &B, &overridden) ||
      !unpack_optional_tensor(op, "bias", args[4], &bias, &overridden)) {
    return nullptr;
  }
  if (python_must_handle(overridden, {&x, &W, &A, &B, bias ? &*bias : nullptr})) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  // The Python wrapper has already turned scale into a float.
  const double scale = PyFloat_AsDouble(args[5]);
  if (scale == -1.0 && PyErr_Occurred()) {
    return nullptr;
  }
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = lora_linear_op(x, W, A, B, bias, scale);
  }
  return wrap_result(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kFastMethods[] = {
    {"lowrank_linear", reinterpret_cast<PyCFunction>(py_lowrank_linear),
     METH_FASTCALL, "lowrank_linear(x, A, B, bias) through the dispatcher."},
    {"lora_linear", reinterpret_cast<PyCFunction>(py_lora_linear),
     METH_FASTCALL, "lora_linear(x, W, A, B, bias, scale) through the dispatcher."},
    {nullptr, nullptr, 0, nullptr}};

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef LOWRANK_EXT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch_version"] = LOWRANK_EXT_TORCH_VERSION;
#if defined(__VERSION__)
  info["compiler"] = __VERSION__;
#elif defined(_MSC_FULL_VER)
  info["compiler"] = "MSVC " + std::to_string(_MSC_FULL_VER);
#else
  info["compiler"] = "unknown";
#endif
  return info;
}

} // namespace
} // namespace lowrank_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of lowrank_ext.";
  m.def("build_info", &lowrank_ext::build_info,
        "What this build of lowrank_ext._C contains.");
  if (PyModule_AddFunctions(m.ptr(), lowrank_ext::kFastMethods) != 0) {
    throw pybind11::error_already_set();
  }
}
