"""Pure-torch kernels of every op.

They are registered as the ``CompositeExplicitAutograd`` kernels, so they run on
any device that has no compiled kernel, and everywhere when ``lowrank_ext._C``
is absent. Semantics match the compiled kernels: the same checks (see
``_checks``), half types accumulated in float32, the intermediate returned in
the input dtype.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from . import _checks

_HALF = (torch.float16, torch.bfloat16)


def _upcast(dtype, *tensors):
    """Half types compute in float32; the others as they are."""
    if dtype not in _HALF:
        return tensors
    return tuple(None if t is None else t.float() for t in tensors)


def _factor_beside(x, A):
    """A as the product with x takes it: dense beside a sparse x, so that the
    intermediate t = x·Aᵀ is dense. torch's products of two sparse matrices
    have gaps (no kernel for mixed layouts; a sparse t that the bias and the
    backward's reshape cannot take), and A is the small operand."""
    return A.to_dense() if x.layout != torch.strided and A.layout != torch.strided else A


def _linear(a, w, bias=None):
    """F.linear(a, w, bias) for a w that may be sparse: F.linear has no kernel
    for a sparse weight with a bias (addmm wants the sparse operand first), so
    the bias is added after the product, as addmm adds it."""
    if w.layout == torch.strided or bias is None:
        return F.linear(a, w, bias)
    return F.linear(a, w) + bias


def _below_view_tracking(*tensors):
    """Where an operand is sparse, the products run below the ADInplaceOrView
    key too, as the C++ autograd kernels run theirs (csrc/autograd.cpp).
    Below autograd alone, where torch.library's autograd kernels call these,
    torch's sparse kernels bump a CSR/CSC operand's version counter (to_dense,
    a product with a CSC x), so the backward of an earlier call that saved it
    failed ("modified by an inplace operation"), and a product of two COO
    matrices returned zeros. (The products are functional: no view or
    in-place op of theirs needs that key.)"""
    if all(t is None or t.layout == torch.strided for t in tensors):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowADInplaceOrView()


def lowrank_forward(x, A, B, bias):
    with _below_view_tracking(x, A, B):
        xc, Ac, Bc, bc = _upcast(x.dtype, x, A, B, bias)
        t = F.linear(xc, _factor_beside(xc, Ac))
        y = _linear(t, Bc, bc)
        return y.to(x.dtype), t.to(x.dtype)


def lowrank_linear(x, A, B, bias):
    _checks.check_lowrank_linear_inputs("lowrank_linear", x, A, B, bias)
    return lowrank_forward(x, A, B, bias)[0]


def lowrank_linear_with_intermediate(x, A, B, bias):
    _checks.check_lowrank_linear_inputs("lowrank_linear", x, A, B, bias)
    return lowrank_forward(x, A, B, bias)


def lora_forward(x, W, A, B, bias, scale):
    with _below_view_tracking(x, A, B):
        xc, Wc, Ac, Bc, bc = _upcast(x.dtype, x, W, A, B, bias)
        t = F.linear(xc, _factor_beside(xc, Ac))
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
    Ws, root = svd_operand(W)
    U, S, Vh = torch.linalg.svd(Ws, full_matrices=False)
    return factors_from_svd(U[:, :rank], S[:rank], Vh[:rank], balanced, W.dtype, root)


def svd_operand(W):
    """``(W / root², root)``: W in the dtype its SVD runs in (float32 for a half
    W), and root = 2**⌈e/2⌉ for max|W| = m·2**e, m in [0.5, 1).

    σ₁ can exceed the dtype's range where every entry of W is finite (4e38 for
    a 4 × 4 float32 W of 1e38), and the factors need not. root is a power of
    two, so the scaling is exact and the SVD gives the same digits as for W;
    :func:`factors_from_svd` gives root back. Tensor ops only, so that under
    torch.vmap each matrix gets its own root; csrc/svd_truncate.cpp computes
    the same one."""
    Wc = W.float() if W.dtype in _HALF else W
    _, e = torch.frexp(Wc.detach().abs().amax())
    root = torch.exp2(torch.div(e + 1, 2, rounding_mode="floor").to(Wc.dtype))
    return Wc / root / root, root


def _identity(t):
    return t


def factors_from_svd(U_r, S_r, Vh_r, balanced, dtype, root, values=_identity):
    """(B, A) in ``dtype`` from the leading singular triplets of W / root²
    (:func:`svd_operand`), in the form svd_truncate documents. ``values`` gives
    the tensor under any torch.func wrapper, for the range check to read."""
    if balanced:
        s = S_r.sqrt()
        scaled = (("B", U_r * s, 1), ("A", Vh_r * s.unsqueeze(1), 1))
    else:
        scaled = (("B", U_r * S_r, 2), ("A", Vh_r, 0))
    return tuple(_restored_factor(name, factor, root, roots, balanced, dtype, values)
                 for name, factor, roots in scaled)


# bfloat16 has float32's range: only float64 holds more.
_WIDER = {torch.float16: "float32", torch.bfloat16: "float64", torch.float32: "float64"}


def _restored_factor(name, scaled, root, roots, balanced, dtype, values):
    """A factor of W / root² times root ``roots`` times (never times root²,
    which is 2**1024 for a float64 W near its largest), in ``dtype``.

    Factors past the dtype's range (B = U·diag(S) where σ₁ exceeds it: a
    float16 W's beyond 65504, a float32 W's of entries near float32's largest)
    would come back as inf from a finite W: an error instead, worded as in
    csrc/svd_truncate.cpp."""
    factor = scaled
    for _ in range(roots):
        factor = factor * root
    out = factor.to(dtype).contiguous()
    if bool(torch.isinf(values(out)).any()):
        size = scaled.detach().abs().amax().double()
        for _ in range(roots):
            size = size * root.double()
        size = float(values(size).max())
        # The size itself can be past float64's range (a float64 W near its largest).
        up_to = "" if math.isinf(size) else f"up to {size:g}, "
        hint = [] if balanced else ["pass balanced=True"]
        if dtype in _WIDER:
            hint.append(f"give a {_WIDER[dtype]} W")
        raise ValueError(
            f"svd_truncate: factor {name} has entries {up_to}beyond "
            f"{_checks.dtype_name(dtype)}'s range (largest {torch.finfo(dtype).max:g})"
            + ("; " + " or ".join(hint) if hint else ""))
    return out
