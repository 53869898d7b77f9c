"""The public fused ops: ``lowrank_linear`` and ``lora_linear``.

Both reach the dispatcher op ``torch.ops.lowrank_ext.<name>``. With the compiled
extension, eager calls go through a direct C entry point (``_C.<name>``), which
costs about as much as one ``F.linear`` call instead of the microseconds of
``torch.ops`` argument parsing; under torch.compile, or when an argument
overrides ``__torch_function__``, the call goes through ``torch.ops`` so that
tracing and tensor subclasses work. Under a ``torch.func`` transform, and
for forward-mode AD's dual tensors, the call goes through ``_functorch``,
whose autograd formulas functorch can see and which has forward formulas
(while compiling too, under a transform other than vmap: recorded as one
call of the graph, ``_ops_under_compile``). While
``torch.onnx.export`` traces a model (either exporter) the ops are recorded as
their pure-torch composition, which ONNX can express: ONNX has no operator for
them.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import Tensor

from . import _backend, _checks, _fallback, _functorch
from ._amp import autocast_enabled
from ._library import ops

_fast_lowrank_linear = getattr(_backend._C, "lowrank_linear", None)
_fast_lora_linear = getattr(_backend._C, "lora_linear", None)
_is_compiling = torch.compiler.is_compiling
_HALF = (torch.float16, torch.bfloat16)


def _exporting_to_onnx(eager: bool) -> bool:
    """Whether an ONNX exporter is tracing this call: the TorchScript-based one
    traces eagerly with the JIT tracer, the torch.export-based one exports."""
    if eager:
        return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def _checks_under_tracer():
    """Validate inputs while the JIT tracer records (TorchScript ONNX export).

    The tracer records sizes as tensors, so comparing them warns that a
    Python boolean becomes a constant of the trace. The checks compute
    nothing the exported graph uses; their warnings would only be noise.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _fx_proxies(*args):
    """Whether torch.fx.symbolic_trace is tracing the call: its Proxy arguments
    are no tensors to check, and record the op they are passed to."""
    return any(isinstance(arg, torch.fx.Proxy) for arg in args)


def lowrank_linear(x: Tensor, A: Tensor, B: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = (x·Aᵀ)·Bᵀ + bias``, the low-rank linear map ``W ≈ B·A`` applied to ``x``.

    Args:
        x: input of shape ``(..., k)``; any number of leading dims, including
            none and zero-sized ones.
        A: the down projection, shape ``(r, k)``.
        B: the up projection, shape ``(d, r)``.
        bias: shape ``(d,)`` or ``None``.

    All tensors share one dtype (float32, float64, float16 or bfloat16; half
    types accumulate in float32) and one device. Returns ``(..., d)``.
    Differentiable in every argument; backward keeps what the wanted
    gradients read (``x``, the factors, the ``(..., r)`` intermediate), never a
    dense ``W``.

    Example:
        >>> B, A = svd_truncate(W, rank=2)
        >>> y = lowrank_linear(x, A, B, bias)   # == x @ (B @ A).T + bias
    """
    eager = not _is_compiling()
    if _fast_lowrank_linear is not None and eager:
        y = _fast_lowrank_linear(x, A, B, bias)
        if y is not NotImplemented:
            return y
    if _fx_proxies(x, A, B, bias):  # torch.fx.symbolic_trace records the op itself
        return ops.lowrank_linear.default(x, A, B, bias)
    _checks.check_is_tensor("lowrank_linear", x=x, A=A, B=B, bias=bias)
    _checks.check_not_nested("lowrank_linear", x=x, A=A, B=B, bias=bias)
    if _exporting_to_onnx(eager):
        with _checks_under_tracer():
            _checks.check_lowrank_linear_inputs("lowrank_linear", x, A, B, bias)
        return _fallback.lowrank_forward(x, A, B, bias)[0]
    if eager and (_functorch.transforms_active() is not None
                  or _functorch.has_tangents(x, A, B, bias)):
        return _functorch.lowrank_linear(x, A, B, bias)
    if not eager and _functorch.transforms_active() is not None:
        from . import _ops_under_compile as under_compile

        # Under grad and the like, the eager route, recorded as one call
        # (functorch cannot see through the op's autograd kernel).
        if under_compile.differentiating_transform_active():
            return under_compile.lowrank_linear(x, A, B, bias)
    return ops.lowrank_linear.default(x, A, B, bias)


def _float_scale(scale):
    """lora_linear's ``scale`` as a float; a TypeError or ValueError for what is none."""
    return _checks.float_scale("lora_linear", scale)


def lora_linear(x: Tensor, W: Tensor, A: Tensor, B: Tensor, bias: Tensor | None = None,
                scale: float = 1.0) -> Tensor:
    """``y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ``: a frozen linear layer plus a LoRA adapter.

    Args:
        x: ``(..., k)``; W: ``(d, k)``; A: ``(r, k)``; B: ``(d, r)``;
        bias: ``(d,)`` or ``None``; scale: a finite number (LoRA's alpha/r).

    Same dtype, device and gradient rules as :func:`lowrank_linear`.
    """
    scale = _float_scale(scale)
    eager = not _is_compiling()
    if _fast_lora_linear is not None and eager:
        y = _fast_lora_linear(x, W, A, B, bias, scale)
        if y is not NotImplemented:
            return y
    if _fx_proxies(x, W, A, B, bias):  # as in lowrank_linear
        return ops.lora_linear.default(x, W, A, B, bias, scale)
    _checks.check_is_tensor("lora_linear", x=x, W=W, A=A, B=B, bias=bias)
    _checks.check_not_nested("lora_linear", x=x, W=W, A=A, B=B, bias=bias)
    # Under torch.compile a scale that differs between compiled layers becomes
    # a symbolic float, which math.isfinite cannot trace; the op's fake kernel
    # checks it there.
    if eager and not math.isfinite(scale):
        # The tensors first, as the C++ checks go: both backends name the same
        # problem where there are several.
        check_lora_linear_tensors(x, W, A, B, bias, 1.0)
        raise ValueError(f"lora_linear: scale must be finite, got {scale}")
    if _exporting_to_onnx(eager):
        with _checks_under_tracer():
            _checks.check_lora_linear_inputs(x, W, A, B, bias, scale)
        return _fallback.lora_forward(x, W, A, B, bias, scale)[0]
    if eager and (_functorch.transforms_active() is not None
                  or _functorch.has_tangents(x, W, A, B, bias)):
        return _functorch.lora_linear(x, W, A, B, bias, scale)
    if not eager and _functorch.transforms_active() is not None:
        from . import _ops_under_compile as under_compile

        if under_compile.differentiating_transform_active():  # as in lowrank_linear
            return under_compile.lora_linear(x, W, A, B, bias, scale)
    return ops.lora_linear.default(x, W, A, B, bias, scale)


def lora_linear_changing_scale(x: Tensor, W: Tensor, A: Tensor, B: Tensor,
                               bias: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """:func:`lora_linear` for a scale that changes between calls (a
    ``LoRALinear`` whose ``scale`` is set anew, as a schedule does).

    torch.compile traces such a float as a symbolic one from its second value
    on, so that one graph serves every value; the op's ``float scale``
    argument would specialize it again: a graph per value, and under
    ``fullgraph=True`` a failure at the recompile limit. So, while compiling,
    the scale stays out of the op: it multiplies the adapter's product, added
    to the base's, as peft composes them (where the op computes in a half
    type, a half-precision B or autocast's dtype, both in float32, rounded
    once, as the op sums them). Otherwise it is :func:`lora_linear`.
    """
    if not _is_compiling():
        return lora_linear(x, W, A, B, bias, scale)
    _checks.check_is_tensor("lora_linear", x=x, W=W, A=A, B=B, bias=bias)
    scale = _float_scale(scale)
    # torch.compile takes a symbolic float to be finite, so this decides
    # nothing for one (and adds no guard); a non-finite constant is refused.
    if not -math.inf < scale < math.inf:
        raise ValueError(f"lora_linear: scale must be finite, got {scale}")
    check_lora_linear_tensors(x, W, A, B, bias, 1.0)
    # The dtype the op computes in: autocast's, if on (which leaves float64).
    device_type = x.device.type
    dtype = (torch.get_autocast_dtype(device_type)
             if B.dtype != torch.float64 and autocast_enabled(device_type) else B.dtype)
    half = dtype in _HALF

    def computed(t):
        # A half type's values in float32, so that the products sum in
        # float32 and round once, as the op sums them: a base product past
        # float16's range that the adapter brings back stays finite.
        return t.to(dtype).float() if half and t is not None else t

    # The composition's order, scale·(t·Bᵀ): scale·B in the op would change
    # the range (a t·Bᵀ past it finite, a scale of 0 giving NaN gradients
    # where gyᵀ·t overflows), as BLAS's pre-scaling did (csrc/lora_linear.cpp).
    with torch.autocast(device_type, enabled=False) if half else contextlib.nullcontext():
        x_computed = computed(x)
        y = (torch.nn.functional.linear(x_computed, computed(W), computed(bias))
             + scale * lowrank_linear(x_computed, computed(A), computed(B)))
    return y.to(dtype) if half else y


def check_lora_linear_tensors(x, W, A, B, bias, scale):
    """lora_linear's checks of its arguments as the op sees them, for the
    routes that compute its function in several products instead, whose own
    errors ("mat1 and mat2 ...") name nothing."""
    if _fx_proxies(x, W, A, B, bias):
        return  # torch.fx.symbolic_trace: no tensors to check
    _checks.check_is_tensor("lora_linear", x=x)
    tensors = (x, W, A, B, bias)
    device_type = x.device.type
    # (False for a device type autocast does not know, meta: there is no
    # autocast to follow there.)
    if autocast_enabled(device_type):
        # The op checks its arguments as autocast casts them (floating
        # ones on its device, float64 excepted, to its dtype): stand-ins
        # with that dtype, one element broadcast, instead of copies.
        dtype = torch.get_autocast_dtype(device_type)
        tensors = tuple(
            torch.empty((), dtype=dtype, device=t.device).expand(t.shape)
            if t is not None and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type else t for t in tensors)
    _checks.check_lora_linear_inputs(*tensors, scale)
