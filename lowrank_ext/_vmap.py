"""Batching rules: ``torch.vmap`` over the fused ops without a per-sample loop.

Without a rule, vmap runs an op once per sample (and warns). With shared
weights, the common case (a module applied to a batch of inputs), the batch
is just one more leading dimension of ``x``, which the ops take as they are.
With per-sample weights (model ensembles, ``functional_call`` over stacked
parameters) the rule runs the same product as batched matmuls, with the
semantics of the pure-torch kernels: half types computed in float32 and
rounded once, every argument checked as the op checks it. Inside
``torch.autocast`` a rule runs before the ops' autocast kernels (vmap's
dispatch key is above autocast's), so it casts the arguments as they do.
"""

import math

import torch

from . import _checks
from ._fallback import _upcast

ops = torch.ops.lowrank_ext


def _autocast_dtype(device_type):
    """The dtype the ops' autocast kernel for the device casts to where it
    runs (inside ``torch.autocast`` for that device), else None."""
    from . import _library  # imported here: _library imports this module first

    if device_type in _library._AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_arguments(*args):
    """``args`` as the ops' autocast kernels pass them on (csrc/autocast.cpp,
    ``_library._autocast_kernel``): inside ``torch.autocast`` for the device
    of x (the first argument), the floating tensors on that device, float64
    excepted, in the autocast dtype; otherwise ``args`` unchanged.

    For the routes that run above the dispatcher's autocast kernels and so
    see the caller's dtypes: these batching rules and ``_functorch``'s
    autograd.Functions. ``Tensor.to`` is differentiable: gradients flow back
    through the casts to the caller's dtypes, as from the kernels' casts.
    """
    device_type = args[0].device.type
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return args
    return tuple(autocast_cast(arg, dtype, device_type) for arg in args)


def autocast_cast(arg, dtype, device_type):
    """``arg`` as an autocast kernel of the ops for ``device_type`` passes it on:
    a floating tensor on that device, float64 excepted, in ``dtype``;
    anything else as it is."""
    if (isinstance(arg, torch.Tensor) and arg.is_floating_point()
            and arg.dtype != torch.float64 and arg.device.type == device_type):
        return arg.to(dtype)
    return arg


def _to_front(t, bdim, size):
    """``t`` with its batch dimension first; unbatched tensors are expanded (no
    copy), a sparse one made dense first: sparse tensors cannot be expanded,
    and the batched products take strided operands."""
    if t is None:
        return None
    if bdim is None:
        if t.layout != torch.strided:
            t = t.to_dense()
        return t.expand(size, *t.shape)
    return t.movedim(bdim, 0)


def _one_sample(t):
    """A tensor shaped like one sample of a batch-first ``t``, for the argument checks."""
    if t is None:
        return None
    return t[0] if t.shape[0] > 0 else t.new_empty(t.shape[1:])


def _samples(args, in_dims):
    """One sample of each argument as the op would see it inside the vmapped
    function: an unbatched argument as it is (its layout too), for the checks
    to report as outside vmap."""
    return [t if d is None or t is None else _one_sample(t.movedim(d, 0))
            for t, d in zip(args, in_dims)]


def _batched_product(x, A, B, bias, W=None, scale=1.0):
    """Per-sample (y, t) for batch-first arguments; x is (n, ..., k)."""
    n, lead, k = x.shape[0], x.shape[1:-1], x.shape[-1]
    rows = math.prod(lead)
    dtype = x.dtype
    xc, Wc, Ac, Bc, bc = _upcast(dtype, x, W, A, B, bias)
    x3 = xc.reshape(n, rows, k)
    # Inside torch.autocast these products run in the autocast dtype, each
    # rounded, whatever the rule sets: ops called from a vmap rule see the
    # dispatch state of when the op reached vmap's level, and leaving that
    # level here fails under an outer grad transform.
    t = torch.matmul(x3, Ac.transpose(1, 2))
    y = torch.matmul(t, Bc.transpose(1, 2))
    if W is not None:
        y = torch.matmul(x3, Wc.transpose(1, 2)) + scale * y
    if bias is not None:
        y = y + bc.unsqueeze(1)
    shape = (n, *lead)
    # Sizes spelled out: with no rows or samples, -1 would be ambiguous.
    return (y.to(dtype).reshape(*shape, Bc.shape[1]),
            t.to(dtype).reshape(*shape, Ac.shape[1]))


def _lowrank_rule(op, returns_t):
    def rule(info, in_dims, x, A, B, bias):
        x, A, B, bias = autocast_arguments(x, A, B, bias)
        x_dim, A_dim, B_dim, bias_dim = in_dims
        # Checked as one sample first, so that errors read as outside vmap
        # (with the sample's shape, not the batch's, and the layouts given).
        _checks.check_lowrank_linear_inputs(
            "lowrank_linear", *_samples((x, A, B, bias), (x_dim, A_dim, B_dim, bias_dim)))
        if x_dim is not None and A_dim is None and B_dim is None and bias_dim is None:
            # Shared weights: the batch is one more leading dimension of x
            # (a 0-D sample, which would pass as one row of the batch's size,
            # was refused above).
            return op(x.movedim(x_dim, 0), A, B, bias), (0, 0) if returns_t else 0
        n = info.batch_size
        x, A, B, bias = (_to_front(t, d, n) for t, d in zip((x, A, B, bias), in_dims))
        y, t = _batched_product(x, A, B, bias)
        return ((y, t), (0, 0)) if returns_t else (y, 0)

    return rule


def _lora_rule(op, returns_t):
    def rule(info, in_dims, x, W, A, B, bias, scale):
        x, W, A, B, bias = autocast_arguments(x, W, A, B, bias)
        x_dim, W_dim, A_dim, B_dim, bias_dim, _ = in_dims
        _checks.check_lora_linear_inputs(  # as above
            *_samples((x, W, A, B, bias), in_dims[:5]), scale)
        if x_dim is not None and W_dim is A_dim is B_dim is bias_dim is None:
            return op(x.movedim(x_dim, 0), W, A, B, bias, scale), (0, 0) if returns_t else 0
        n = info.batch_size
        x, W, A, B, bias = (_to_front(t, d, n) for t, d in zip((x, W, A, B, bias), in_dims))
        y, t = _batched_product(x, A, B, bias, W=W, scale=scale)
        return ((y, t), (0, 0)) if returns_t else (y, 0)

    return rule


def register(lib):
    """Register the rules on ``lib`` (the library that defines the ops)."""
    rules = {
        "lowrank_linear": _lowrank_rule(ops.lowrank_linear.default, False),
        "lowrank_linear_with_intermediate": _lowrank_rule(
            ops.lowrank_linear_with_intermediate.default, True),
        "lora_linear": _lora_rule(ops.lora_linear.default, False),
        "lora_linear_with_intermediate": _lora_rule(
            ops.lora_linear_with_intermediate.default, True),
    }
    for name, rule in rules.items():
        torch.library.register_vmap(f"lowrank_ext::{name}", rule, lib=lib)
