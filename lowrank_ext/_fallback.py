"""Pure-torch kernels of every op.

They are registered as the ``CompositeExplicitAutograd`` kernels, so they run on
any device that has no compiled kernel, and everywhere when ``lowrank_ext._C``
is absent. Semantics match the compiled kernels: the same checks (see
``_checks``), half types accumulated in float32, the intermediate returned in
the input dtype.
"""

import torch
import torch.nn.functional as F

from . import _checks

_HALF = (torch.float16, torch.bfloat16)


def _upcast(dtype, *tensors):
    """Half types compute in float32; the others as they are."""
    if dtype not in _HALF:
        return tensors
    return tuple(None if t is None else t.float() for t in tensors)


def lowrank_forward(x, A, B, bias):
    xc, Ac, Bc, bc = _upcast(x.dtype, x, A, B, bias)
    t = F.linear(xc, Ac)
    y = F.linear(t, Bc, bc)
    return y.to(x.dtype), t.to(x.dtype)


def lowrank_linear(x, A, B, bias):
    _checks.check_lowrank_linear_inputs("lowrank_linear", x, A, B, bias)
    return lowrank_forward(x, A, B, bias)[0]


def lowrank_linear_with_intermediate(x, A, B, bias):
    _checks.check_lowrank_linear_inputs("lowrank_linear", x, A, B, bias)
    return lowrank_forward(x, A, B, bias)


def lora_forward(x, W, A, B, bias, scale):
    xc, Wc, Ac, Bc, bc = _upcast(x.dtype, x, W, A, B, bias)
    t = F.linear(xc, Ac)
    y = F.linear(xc, Wc, bc) + scale * F.linear(t, Bc)
    return y.to(x.dtype), t.to(x.dtype)


def lora_linear(x, W, A, B, bias, scale):
    _checks.check_lora_linear_inputs(x, W, A, B, bias, scale)
    return lora_forward(x, W, A, B, bias, scale)[0]


def lora_linear_with_intermediate(x, W, A, B, bias, scale):
    _checks.check_lora_linear_inputs(x, W, A, B, bias, scale)
    return lora_forward(x, W, A, B, bias, scale)


def _weight_grad(a, b):
    """aᵀ·b, the backward's weight gradients (the CPU build has a kernel for it).

    Defined for every backend so that a compiled graph recorded with the
    extension still runs without it (torch.compile caches graphs on disk)."""
    _checks.check_weight_grad_inputs(a, b)
    return a.t().mm(b)


def _rows_times_weight(g, W):
    """g·W in float32 for a float32 g, whatever W's floating dtype (the CPU
    build streams W instead at a few rows; defined everywhere like _weight_grad)."""
    _checks.check_rows_times_weight_inputs(g, W)
    return g.mm(W.to(torch.float32))


def svd_truncate(W, rank, balanced):
    _checks.check_svd_matrix(W)
    _checks.check_svd_rank(W, rank)
    _checks.check_svd_finite(W)
    Wc = W.float() if W.dtype in _HALF else W
    U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
    return factors_from_svd(U[:, :rank], S[:rank], Vh[:rank], balanced, W.dtype)


def factors_from_svd(U_r, S_r, Vh_r, balanced, dtype):
    """(B, A) from the leading singular triplets, in the form svd_truncate documents."""
    if balanced:
        root = S_r.sqrt()
        B, A = U_r * root, Vh_r * root.unsqueeze(1)
    else:
        B, A = U_r * S_r, Vh_r
    out_B, out_A = B.to(dtype).contiguous(), A.to(dtype).contiguous()
    if dtype in _HALF:
        _check_factors_fit(B, A, out_B, out_A, balanced, dtype)
    return out_B, out_A


def _check_factors_fit(B, A, out_B, out_A, balanced, dtype):
    """Factors past the half dtype's range (B = U·diag(S) of a float16 W whose
    σ exceed 65504) would come back as inf from a finite W: an error instead,
    worded as in csrc/svd_truncate.cpp."""
    for name, factor, out in (("B", B, out_B), ("A", A, out_A)):
        if bool(torch.isinf(out).any()):
            hint = "give a float32 W" if balanced else "pass balanced=True or give a float32 W"
            raise ValueError(
                f"svd_truncate: factor {name} has entries up to {float(factor.abs().max()):g}, "
                f"beyond {_checks.dtype_name(dtype)}'s range (largest "
                f"{torch.finfo(dtype).max:g}); {hint}")
