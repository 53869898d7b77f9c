"""Batching rules: ``torch.vmap`` over the fused ops without a per-sample loop.

Without a rule, vmap runs an op once per sample (and warns). With shared
weights, the common case (a module applied to a batch of inputs), the batch
is just one more leading dimension of ``x``, which the ops take as they are.
With per-sample weights (model ensembles, ``functional_call`` over stacked
parameters) the rule runs the same product as batched matmuls, with the
semantics of the pure-torch kernels: half types computed in float32 and
rounded once, every argument checked as the op checks it.
"""

import math

import torch

from . import _checks
from ._fallback import _upcast

ops = torch.ops.lowrank_ext


def _to_front(t, bdim, size):
    """``t`` with its batch dimension first; unbatched tensors are expanded (no copy)."""
    if t is None:
        return None
    if bdim is None:
        return t.expand(size, *t.shape)
    return t.movedim(bdim, 0)


def _one_sample(t):
    """A tensor shaped like one sample of a batch-first ``t``, for the argument checks."""
    if t is None:
        return None
    return t[0] if t.shape[0] > 0 else t.new_empty(t.shape[1:])


def _batched_product(x, A, B, bias, W=None, scale=1.0):
    """Per-sample (y, t) for batch-first arguments; x is (n, ..., k)."""
    n, lead, k = x.shape[0], x.shape[1:-1], x.shape[-1]
    rows = math.prod(lead)
    dtype = x.dtype
    xc, Wc, Ac, Bc, bc = _upcast(dtype, x, W, A, B, bias)
    x3 = xc.reshape(n, rows, k)
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
        x_dim, A_dim, B_dim, bias_dim = in_dims
        if x_dim is not None and A_dim is None and B_dim is None and bias_dim is None:
            # Shared weights: the batch is one more leading dimension of x,
            # unless a sample is 0-D, which the op refuses (x would pass as
            # one row of the batch's size).
            if x.dim() == 1:
                _checks.check_lowrank_linear_inputs("lowrank_linear", _one_sample(x), A, B,
                                                    bias)
            return op(x.movedim(x_dim, 0), A, B, bias), (0, 0) if returns_t else 0
        n = info.batch_size
        x, A, B, bias = (_to_front(t, d, n) for t, d in zip((x, A, B, bias), in_dims))
        _checks.check_lowrank_linear_inputs("lowrank_linear", *map(_one_sample, (x, A, B, bias)))
        y, t = _batched_product(x, A, B, bias)
        return ((y, t), (0, 0)) if returns_t else (y, 0)

    return rule


def _lora_rule(op, returns_t):
    def rule(info, in_dims, x, W, A, B, bias, scale):
        x_dim, W_dim, A_dim, B_dim, bias_dim, _ = in_dims
        if x_dim is not None and W_dim is A_dim is B_dim is bias_dim is None:
            if x.dim() == 1:  # a 0-D sample, as above
                _checks.check_lora_linear_inputs(_one_sample(x), W, A, B, bias, scale)
            return op(x.movedim(x_dim, 0), W, A, B, bias, scale), (0, 0) if returns_t else 0
        n = info.batch_size
        x, W, A, B, bias = (_to_front(t, d, n) for t, d in zip((x, W, A, B, bias), in_dims))
        _checks.check_lora_linear_inputs(*map(_one_sample, (x, W, A, B, bias)), scale)
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
