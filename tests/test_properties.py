"""Property-based tests: random shapes (0 and 1 included, odd tails), dtypes,
strides and views, with or without bias. The active backend, the pure-torch
kernels and a float64 dense reference agree, for outputs and gradients."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import lowrank_ext as lx  # noqa: E402
from lowrank_ext import _fallback  # noqa: E402
from conftest import TOLERANCES  # noqa: E402
from reference import lora_reference, lowrank_reference  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = list(TOLERANCES)


@st.composite
def layouts(draw, *shape_and_dtype):
    """A tensor of the given shape in a random layout: contiguous, transposed
    storage, a strided slice, or broadcast (stride 0) along a leading dim."""
    shape, dtype = shape_and_dtype
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced", "broadcast"]))
    base = lambda s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    if kind == "transposed" and len(shape) >= 2:
        return base(shape[::-1]).permute(*range(len(shape) - 1, -1, -1))
    if kind == "sliced" and len(shape) >= 1:
        return base((*shape[:-1], 2 * shape[-1] + 1))[..., 1::2]
    if kind == "broadcast" and len(shape) >= 2 and shape[0] > 0:
        return base((1, *shape[1:])).expand(*shape)
    return base(shape)


@st.composite
def lowrank_problems(draw, with_W=False):
    dtype = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    k = draw(st.integers(0, 33))
    r = draw(st.integers(0, 9))
    d = draw(st.integers(0, 33))
    x = draw(layouts(lead + (k,), dtype))
    A = draw(layouts((r, k), dtype)) / max(k, 1) ** 0.5
    B = draw(layouts((d, r), dtype)) / max(r, 1) ** 0.5
    bias = draw(st.one_of(st.none(), layouts((d,), dtype)))
    W = draw(layouts((d, k), dtype)) / max(k, 1) ** 0.5 if with_W else None
    return x, W, A, B, bias


def _check(out, ref, dtype):
    tol = TOLERANCES[dtype]
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale)


@settings(max_examples=250, **SETTINGS)
@given(lowrank_problems())
def test_lowrank_linear_property(problem):
    x, _, A, B, bias = problem
    ref = lowrank_reference(x, A, B, bias)
    _check(lx.lowrank_linear(x, A, B, bias), ref, x.dtype)
    _check(_fallback.lowrank_linear(x, A, B, bias), ref, x.dtype)


@settings(max_examples=150, **SETTINGS)
@given(lowrank_problems(with_W=True), st.floats(-4, 4, allow_nan=False))
def test_lora_linear_property(problem, scale):
    x, W, A, B, bias = problem
    ref = lora_reference(x, W, A, B, bias, scale)
    _check(lx.lora_linear(x, W, A, B, bias, scale), ref, x.dtype)
    _check(_fallback.lora_linear(x, W, A, B, bias, scale), ref, x.dtype)


@settings(max_examples=150, **SETTINGS)
@given(lowrank_problems(with_W=True), st.booleans())
def test_gradients_property(problem, lora):
    x, W, A, B, bias = problem
    dtype = torch.float64 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    leaves = [t.detach().to(dtype).clone().requires_grad_() if t is not None else None
              for t in (x, W, A, B, bias)]
    refs = [t.detach().double().clone().requires_grad_() if t is not None else None
            for t in (x, W, A, B, bias)]
    if lora:
        out = lx.lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], 0.5)
        ref = lora_reference(refs[0], refs[1], refs[2], refs[3], refs[4], 0.5)
        used = [0, 1, 2, 3, 4]
    else:
        out = lx.lowrank_linear(leaves[0], leaves[2], leaves[3], leaves[4])
        ref = lowrank_reference(refs[0], refs[2], refs[3], refs[4])
        used = [0, 2, 3, 4]
    gy = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(gy.to(dtype))
    ref.backward(gy)
    for i in used:
        if leaves[i] is None:
            continue
        _check(leaves[i].grad, refs[i].grad, dtype)
