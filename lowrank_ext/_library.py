"""Defines the ``lowrank_ext`` ops and registers everything but the compiled kernels.

The schemas live here, once, for both backends. The compiled extension
(``_backend``, imported first) registers C++ kernels for the CPU and CUDA keys
and a C++ autograd kernel; this module adds

* the pure-torch kernels as ``CompositeExplicitAutograd`` defaults, so any
  device without a compiled kernel still works;
* fake (meta) kernels for torch.compile;
* when ``_C`` is absent, the Python autograd kernels;
* autocast rules for the devices that have no C++ one (all of them when
  ``_C`` is absent);
* batching rules for ``torch.vmap`` (``_vmap``).
"""

import functools
import math
import warnings

import torch
import torch.autograd.forward_ad as fwAD

from . import _backend, _checks, _fallback, _vmap
from ._amp import outside_autocast

NAMESPACE = "lowrank_ext"

SCHEMAS = {
    "lowrank_linear": "lowrank_linear(Tensor x, Tensor A, Tensor B, Tensor? bias) -> Tensor",
    "lowrank_linear_with_intermediate": (
        "lowrank_linear_with_intermediate(Tensor x, Tensor A, Tensor B, Tensor? bias)"
        " -> (Tensor, Tensor)"),
    "lora_linear": (
        "lora_linear(Tensor x, Tensor W, Tensor A, Tensor B, Tensor? bias, float scale)"
        " -> Tensor"),
    "lora_linear_with_intermediate": (
        "lora_linear_with_intermediate(Tensor x, Tensor W, Tensor A, Tensor B, Tensor? bias,"
        " float scale) -> (Tensor, Tensor)"),
    "svd_truncate": "svd_truncate(Tensor W, int rank, bool balanced) -> (Tensor B, Tensor A)",
    # aᵀ·b for the CPU backward's weight gradients; internal.
    "_weight_grad": "_weight_grad(Tensor a, Tensor b) -> Tensor",
    # float32 g·W with W in its own layout: lora_linear's CPU backward gx at a
    # few rows; internal.
    "_rows_times_weight": "_rows_times_weight(Tensor g, Tensor W) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

ops = torch.ops.lowrank_ext

# --- pure-torch defaults -----------------------------------------------------
for _name in SCHEMAS:
    _lib.impl(_name, getattr(_fallback, _name), "CompositeExplicitAutograd")


# --- fake kernels -------------------------------------------------------------
def _out_shape(x, last):
    return (*x.shape[:-1], last)


@torch.library.register_fake("lowrank_ext::lowrank_linear")
def _lowrank_linear_fake(x, A, B, bias):
    _checks.check_lowrank_linear_inputs("lowrank_linear", x, A, B, bias)
    return x.new_empty(_out_shape(x, B.shape[0]))


@torch.library.register_fake("lowrank_ext::lowrank_linear_with_intermediate")
def _lowrank_linear_with_intermediate_fake(x, A, B, bias):
    _checks.check_lowrank_linear_inputs("lowrank_linear", x, A, B, bias)
    return x.new_empty(_out_shape(x, B.shape[0])), x.new_empty(_out_shape(x, A.shape[0]))


@torch.library.register_fake("lowrank_ext::lora_linear")
def _lora_linear_fake(x, W, A, B, bias, scale):
    _checks.check_lora_linear_inputs(x, W, A, B, bias, scale)
    return x.new_empty(_out_shape(x, W.shape[0]))


@torch.library.register_fake("lowrank_ext::lora_linear_with_intermediate")
def _lora_linear_with_intermediate_fake(x, W, A, B, bias, scale):
    _checks.check_lora_linear_inputs(x, W, A, B, bias, scale)
    return x.new_empty(_out_shape(x, W.shape[0])), x.new_empty(_out_shape(x, A.shape[0]))


@torch.library.register_fake("lowrank_ext::svd_truncate")
def _svd_truncate_fake(W, rank, balanced):
    _checks.check_svd_matrix(W)
    _checks.check_svd_rank(W, rank)
    return W.new_empty((W.shape[0], rank)), W.new_empty((rank, W.shape[1]))


def _svd_truncate_autograd(W, rank, balanced):
    """svd_truncate's autograd kernel (both backends): where W asks for a
    gradient or carries a forward-mode tangent, the factors come from the
    differentiable torch ops that give the kernels' values
    (svd._differentiable: torch.linalg.svd's derivatives); elsewhere the
    kernels below autograd. Without it, torch ran the op through its
    deprecated autograd fallthrough, with a warning."""
    from ._functorch import has_tangents  # it imports this module
    from ._checks import holds_values
    from .svd import _differentiable

    if (torch.is_grad_enabled() and W.requires_grad) or has_tangents(W):
        if holds_values(W):
            return _differentiable(W, rank, balanced)
        if not W.is_meta:  # a meta W has shapes only, with or without a gradient
            # A fake W: shapes for FakeTensorMode, but a graph traced from
            # them (torch.compile, export) cannot differentiate the kernels,
            # which read W's values.
            warnings.warn(
                "svd_truncate: the op, traced with a W that requires grad, gives factors "
                "without a gradient (its kernels read W's values to choose the SVD's "
                "scaling); lowrank_ext.svd_truncate runs such a call outside the compiled "
                "graph", stacklevel=2)
    with torch._C._AutoDispatchBelowAutograd():
        return ops.svd_truncate.default(W, rank, balanced)


_lib.impl("svd_truncate", _svd_truncate_autograd, "Autograd")


@torch.library.register_fake("lowrank_ext::_weight_grad")
def _weight_grad_fake(a, b):
    _checks.check_weight_grad_inputs(a, b)
    return a.new_empty((a.shape[1], b.shape[1]))


@torch.library.register_fake("lowrank_ext::_rows_times_weight")
def _rows_times_weight_fake(g, W):
    _checks.check_rows_times_weight_inputs(g, W)
    return g.new_empty((g.shape[0], W.shape[1]))


# --- autograd (Python; the compiled build registers the same in C++) ----------
def _intermediate_for_backward(x, A, t):
    """The saved t = x·Aᵀ carries no graph (it was computed below autograd); a
    backward that is itself differentiated recomputes it so gradients reach x and A,
    and so does one ``torch.jit.trace`` records, to which the saved t is a
    constant of the trace (csrc/autograd.cpp, plain_ops_only)."""
    stand_ins = (x.is_meta or A.is_meta) and not t.is_meta  # see _kept_for_backward
    if (not torch.is_grad_enabled() and not torch.jit.is_tracing()) or stand_ins:
        return t
    return torch.matmul(x, _fallback._factor_beside(x, A).t())  # dense, as t


def _kept_for_backward(t, read):
    """An operand to save for backward: itself where a wanted gradient reads its
    values, else a stand-in on the meta device with its shape, strides and dtype
    (the backward reads every operand's shape), as the C++ backward keeps them
    (csrc/autograd.cpp, kept_for_backward): like torch's composition, an operand
    changed in place after the forward fails only a backward that reads it, and
    no unread operand is kept alive. Under any trace, a dispatch mode or a
    tensor subclass, with saved-tensor hooks (``save_on_cpu`` would copy a
    stand-in's data, which it has none of), and for sparse operands, everything
    is kept."""
    if (read or t is None or t.layout != torch.strided or t.is_meta
            or type(t) not in (torch.Tensor, torch.nn.Parameter)
            or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _kept_operands(needs, x, A, B, t):
    """(x, A, B, t) as saved: gx reads A and B (through gt = gy·B), gA reads x
    and B, gB reads t, and a differentiated backward recomputes t from x and A
    where a gradient can flow through it to them. ``needs``: x, A, B, and
    whether x is read for another gradient (lora_linear's gW)."""
    grad_x, grad_A, grad_B, x_read_elsewhere = needs
    through_t = grad_B and (grad_x or grad_A)
    return (_kept_for_backward(x, grad_A or through_t or x_read_elsewhere),
            _kept_for_backward(A, grad_x or through_t),
            _kept_for_backward(B, grad_x or grad_A), _kept_for_backward(t, grad_B))


def _outside_autocast(grads):
    """``grads`` run with autocast off on the gradient's device: the backward
    computes in the dtypes the forward saved, as the C++ one does
    (csrc/autograd.cpp, OutsideAutocast). Inside an autocast region (backward()
    called under torch.autocast, or AOTAutograd tracing it under the caller's
    autocast) the products were cast to the autocast dtype, so the gradients
    of a float32 call differed between the backends."""
    @functools.wraps(grads)
    def run(needs, gy, *args, **kwargs):
        with outside_autocast(gy.device.type):
            return grads(needs, gy, *args, **kwargs)
    return run


def _times(a, b):
    """a·b where b may be a sparse x or factor (the ops take COO, CSR and CSC).
    torch's CPU products with a sparse CSR/CSC second operand have no float16
    or bfloat16 kernel: a half-type sparse b is multiplied in float32, as the
    forward computes, and the product rounded once (csrc/autograd.cpp,
    matrix_product)."""
    if b.layout == torch.strided or b.dtype not in _fallback._HALF:
        return a.mm(b)
    return a.float().mm(b.float()).to(a.dtype)


def _add_product(c, a, b):
    """c + a·b: addmm takes no sparse second operand."""
    return torch.addmm(c, a, b) if b.layout == torch.strided else c + _times(a, b)


def _rows(x, M, k):
    """x as (M, k) rows for a product. A sparse x, which the ops take, is 2-D
    already and has no reshape (its weight gradients failed)."""
    return x if x.layout != torch.strided else x.reshape(M, k)


@_outside_autocast
def _lowrank_grads(needs, gy, x, A, B, t, gt_out=None):
    """Gradients of y = t·Bᵀ + bias, t = x·Aᵀ: (gx, gA, gB, gbias); ``gt_out``,
    the gradient reaching t itself where t is an output too."""
    need_x, need_A, need_B, need_bias = needs
    k, r, d = A.shape[1], A.shape[0], B.shape[0]
    M = math.prod(x.shape[:-1])  # reshape's -1 is ambiguous once k, r or d is 0
    gy2 = gy.reshape(M, d)
    gx = gA = gB = gbias = None
    if need_x or need_A:
        # float16: gt = gy·B is formed in float32 and gx = gt·A, gA = gtᵀ·x are
        # rounded once from it: gt rounded to float16 is inf past 65504, where
        # the gradients themselves can be representable. (bfloat16 has
        # float32's range: rounding its gt costs digits, not the range.)
        wide = torch.float32 if gy2.dtype == torch.float16 else gy2.dtype
        gt = _times(gy2.to(wide), B.to(wide))
        if gt_out is not None:
            gt = gt + gt_out.reshape(M, r)
        if need_x:
            gx = _times(gt, A.to(wide)).to(x.dtype).reshape(x.shape)
        if need_A:
            gA = _times(gt.t(), _rows(x, M, k).to(wide)).to(A.dtype)
    if need_B:
        gB = gy2.t().mm(_intermediate_for_backward(x, A, t).reshape(M, r))
    if need_bias:
        gbias = gy2.sum(0)
    return gx, gA, gB, gbias


@_outside_autocast
def _lora_grads(needs, gy, x, W, A, B, t, scale, gt_out=None):
    """Gradients of y = x·Wᵀ + bias + scale·t·Bᵀ, t = x·Aᵀ: (gx, gW, gA, gB, gbias);
    ``gt_out`` as in :func:`_lowrank_grads`."""
    need_x, need_W, need_A, need_B, need_bias = needs
    # (From A and B: W is saved only where x's gradient is wanted.)
    k, r, d = A.shape[1], A.shape[0], B.shape[0]
    M = math.prod(x.shape[:-1])
    gy2 = gy.reshape(M, d)
    # float16: the adapter's products (gt = scale·gy·B, gB = scale·gyᵀ·t) are
    # formed from gy in float32 and rounded once, as in the C++ backward
    # (csrc/autograd.cpp): in float16 they can overflow where the gradients
    # are representable, and scale·gy loses digits to subnormals for a small
    # scale. bfloat16 has float32's range.
    wide = torch.float32 if gy2.dtype == torch.float16 else gy2.dtype
    # (Not made where only W's or the bias's gradient is wanted.)
    gy_wide = gy2.to(wide) if need_x or need_A or need_B else None
    # The adapter's products take scale·gy, as the composition forms them
    # (see csrc/autograd.cpp): scaling a product after it, or the small
    # factor B or t before it, changed the range.
    scaled_gy = None if gy_wide is None else gy_wide if scale == 1.0 else gy_wide * scale
    gx = gW = gA = gB = gbias = gt = None
    # Both products of scale·gy first, so that its (M × d) copy is freed
    # before gx's (M × k) buffers are made: the peak stays the composition's.
    if need_B:
        t2 = _intermediate_for_backward(x, A, t).reshape(M, r)
        gB = scaled_gy.t().mm(t2.to(wide)).to(B.dtype)
    if need_x or need_A:
        gt = _times(scaled_gy, B.to(wide))
        if gt_out is not None:
            gt = gt + gt_out.reshape(M, r)
    del scaled_gy
    if need_x:
        # On the CPU a float16 gy·W is formed in float32 too (see the C++
        # backward); on devices the half type's GEMM takes it.
        dense = (gy_wide.mm(W.to(wide)) if gy2.device.type == "cpu"
                 else gy2.mm(W).to(wide))
        # (Not in place: under torch.func, dense may be unbatched where gt is.)
        gx = _add_product(dense, gt, A.to(wide))
        del dense
        gx = gx.to(x.dtype).reshape(x.shape)
    if need_A:
        gA = _times(gt.t(), _rows(x, M, k).to(wide)).to(A.dtype)
    if need_W:
        gW = _times(gy2.t(), _rows(x, M, k))
    if need_bias:
        gbias = gy2.sum(0)
    return gx, gW, gA, gB, gbias


class _LowRankLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, bias):
        with torch._C._AutoDispatchBelowAutograd():
            y, t = ops.lowrank_linear_with_intermediate.default(x, A, B, bias)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(*_kept_operands((*needs[:3], False), x, A, B, t))
        return y

    @staticmethod
    def backward(ctx, gy):
        x, A, B, t = ctx.saved_tensors
        return _lowrank_grads(ctx.needs_input_grad, gy, x, A, B, t)


class _LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, A, B, bias, scale):
        with torch._C._AutoDispatchBelowAutograd():
            y, t = ops.lora_linear_with_intermediate.default(x, W, A, B, bias, scale)
        # W only where x's gradient is wanted (see csrc/autograd.cpp): a base
        # weight made under torch.inference_mode() cannot be saved.
        needs = ctx.needs_input_grad
        x, A, B, t = _kept_operands((needs[0], needs[2], needs[3], needs[1]), x, A, B, t)
        ctx.save_for_backward(x, W if needs[0] else None, A, B, t)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, gy):
        x, W, A, B, t = ctx.saved_tensors
        return (*_lora_grads(ctx.needs_input_grad[:5], gy, x, W, A, B, t, ctx.scale), None)


def _check_no_functorch_transform(op, function):
    """Refuse a direct call of ``torch.ops.lowrank_ext.<op>`` under a
    torch.func transform, in the words of the C++ autograd kernels
    (csrc/autograd.cpp, check_no_functorch_transform): functorch cannot see
    through the ops' autograd kernels, and torch's own errors there speak of
    its internals. ``function`` is the Python function that supports them."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            f"{op}: torch.ops.lowrank_ext.{op} cannot be differentiated under a torch.func "
            f"transform (grad, vjp, jacrev, ...), which cannot see through its autograd "
            f"kernel; call lowrank_ext.{function} (the Python function), which supports them")


def _without_tangents(op, apply):
    """``apply`` refusing forward-mode AD tangents, as the C++ autograd kernels
    do (csrc/autograd.cpp, check_no_forward_grad): the Function has no jvp.
    The Python functions route such calls elsewhere (_functorch.py); inside
    a custom Function's forward, forward grad mode is off and tangents are
    not looked at, as in C++."""
    def run(*args):
        if torch._C._is_fwd_grad_enabled() and any(
                isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None
                for a in args):
            raise RuntimeError(
                f"{op}: forward-mode AD (an argument with a tangent, such as a dual tensor) "
                f"is not supported by torch.ops.lowrank_ext.{op}, which would drop the "
                f"tangent; call lowrank_ext.{op} (the Python function), which supports it")
        if not (torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            # Nothing to record: the op itself below autograd, as the C++
            # kernel does (any_requires_grad), so that a trace of it (export's
            # run_decompositions) keeps this op, not the Function's forward.
            with torch._C._AutoDispatchBelowAutograd():
                return getattr(ops, op).default(*args)
        _check_no_functorch_transform(op, op)
        return apply(*args)
    return run


if not _backend.compiled:
    _lib.impl("lowrank_linear", _without_tangents("lowrank_linear", _LowRankLinearFunction.apply),
              "Autograd")
    _lib.impl("lora_linear", _without_tangents("lora_linear", _LoRALinearFunction.apply),
              "Autograd")


# The forms that also return t = x·Aᵀ are what the autograd kernels above
# call below autograd; called directly they get a backward of their own (both
# backends), through y and through t.
class _LowRankWithIntermediateFunction(torch.autograd.Function):
    # forward without ctx plus setup_context: the form torch.func (also under
    # torch.compile) accepts.
    @staticmethod
    def forward(x, A, B, bias):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.lowrank_linear_with_intermediate.default(x, A, B, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, A, B, _ = inputs
        ctx.save_for_backward(x, A, B, output[1])

    @staticmethod
    def backward(ctx, gy, gt):
        x, A, B, t = ctx.saved_tensors
        return _lowrank_grads(ctx.needs_input_grad, gy, x, A, B, t, gt_out=gt)


class _LoRAWithIntermediateFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, W, A, B, bias, scale):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.lora_linear_with_intermediate.default(x, W, A, B, bias, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W, A, B, _, scale = inputs
        ctx.save_for_backward(x, W if ctx.needs_input_grad[0] else None, A, B, output[1])
        ctx.scale = scale

    @staticmethod
    def backward(ctx, gy, gt):
        x, W, A, B, t = ctx.saved_tensors
        return (*_lora_grads(ctx.needs_input_grad[:5], gy, x, W, A, B, t, ctx.scale,
                             gt_out=gt), None)


def _outside_transforms(op, function, apply):
    """``apply`` refusing a call under a torch.func transform, as the other
    ops' autograd kernels do. Their own routes under a transform reach these
    forms only below it (``_functorch``'s Functions, the batching rules)."""
    def run(*args):
        _check_no_functorch_transform(op, function)
        return apply(*args)
    return run


_lib.impl("lowrank_linear_with_intermediate",
          _outside_transforms("lowrank_linear_with_intermediate", "lowrank_linear",
                              _LowRankWithIntermediateFunction.apply), "Autograd")
_lib.impl("lora_linear_with_intermediate",
          _outside_transforms("lora_linear_with_intermediate", "lora_linear",
                              _LoRAWithIntermediateFunction.apply), "Autograd")


# --- autocast -----------------------------------------------------------------
# Inside torch.autocast the fused ops follow F.linear's policy: floating-point
# arguments on the autocast device, float64 excepted, are cast to the autocast
# dtype and the op runs with autocast off for that device. The compiled build
# registers this rule in C++ for CPU and CUDA (csrc/autocast.cpp); these Python
# kernels cover the other devices, and every device without ``_C``.
_AUTOCAST_OPS = (
    "lowrank_linear", "lowrank_linear_with_intermediate",
    "lora_linear", "lora_linear_with_intermediate",
)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "privateuseone")


def _autocast_kernel(op_name, device_type):
    op = getattr(ops, op_name).default
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(_vmap.autocast_cast(a, dtype, device_type) for a in args))

    return kernel


def _register_autocast():
    compiled_devices = ("cpu", "cuda") if _backend.compiled else ()
    for device_type in _AUTOCAST_DEVICES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        if device_type in compiled_devices or not hasattr(torch._C.DispatchKey, key_name):
            continue
        for name in _AUTOCAST_OPS:
            _lib.impl(name, _autocast_kernel(name, device_type), key_name)


_register_autocast()
_vmap.register(_lib)
