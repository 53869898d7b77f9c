"""Gradients: gradcheck in float64, agreement with autograd through the dense
reference, and what backward keeps alive."""

import pytest
import torch

import lowrank_ext as lx
from conftest import TOLERANCES
from reference import bfloat16_gemm_is_slow, float16_gemm_is_slow, product_dtypes


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (0,)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_lowrank_linear(lead, bias):
    x, A, B = _leaf(*lead, 7), _leaf(3, 7), _leaf(5, 3)
    b = _leaf(5) if bias else None
    assert torch.autograd.gradcheck(lx.lowrank_linear, (x, A, B, b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_lora_linear(bias):
    x, W, A, B = _leaf(4, 6), _leaf(5, 6), _leaf(2, 6), _leaf(5, 2)
    b = _leaf(5) if bias else None
    assert torch.autograd.gradcheck(lambda *a: lx.lora_linear(*a, scale=0.7), (x, W, A, B, b))


@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
@pytest.mark.parametrize("M", [1, 16, 300, 1600])
def test_float32_gradients_match_float64(op, M):
    # The CPU backward's products run the _weight_grad kernel (gx too from 4
    # rows); from 1536 rows lowrank_linear fuses gx = (gy·B)·A.
    k, r, d = 70, 20, 45
    x, W, A, B, b = (torch.randn(M, k), torch.randn(d, k) / 8, torch.randn(r, k) / 8,
                     torch.randn(d, r) / 4, torch.randn(d))
    gy = torch.randn(M, d)

    def run(dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (x, W, A, B, b)]
        xl, Wl, Al, Bl, bl = leaves
        if op == "lowrank_linear":
            y = lx.lowrank_linear(xl, Al, Bl, bl) if dtype == torch.float32 \
                else xl @ (Bl @ Al).T + bl
        else:
            y = lx.lora_linear(xl, Wl, Al, Bl, bl, scale=0.7) if dtype == torch.float32 \
                else xl @ (Wl + 0.7 * Bl @ Al).T + bl
        y.backward(gy.to(dtype))
        return [t.grad for t in leaves]

    for mine, ref in zip(run(torch.float32), run(torch.float64)):
        if ref is None:
            assert mine is None
            continue
        scale = max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(mine.double(), ref, rtol=1e-5, atol=1e-5 * scale)


def test_gradgradcheck_lowrank_linear():
    x, A, B, b = _leaf(3, 5), _leaf(2, 5), _leaf(4, 2), _leaf(4)
    assert torch.autograd.gradgradcheck(lx.lowrank_linear, (x, A, B, b))


def test_float16_double_backward_matches_float64():
    # The float16 backward forms gt = gy·B in float32 (tests/test_numerics.py);
    # built with create_graph, it must stay differentiable.
    x, A, B, b = torch.randn(6, 16), torch.randn(4, 16) / 4, torch.randn(8, 4) / 2, torch.randn(8)
    gy, v = torch.randn(6, 8), torch.randn(6, 16)

    def second(dtype):
        x_, A_, B_, b_ = (t.half().to(dtype).requires_grad_() for t in (x, A, B, b))
        y = (lx.lowrank_linear(x_, A_, B_, b_) if dtype == torch.float16
             else x_ @ (B_ @ A_).T + b_)
        gx, = torch.autograd.grad(y, x_, gy.half().to(dtype), create_graph=True)
        return torch.autograd.grad((gx * v.half().to(dtype)).sum(), (A_, B_))

    for mine, ref in zip(second(torch.float16), second(torch.float64)):
        assert mine.dtype == torch.float16
        torch.testing.assert_close(mine.double(), ref, rtol=1e-2,
                                   atol=1e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_gradients_match_dense_reference(dtype):
    k, r, d = 64, 8, 48
    x, A, B, b = (torch.randn(5, 3, k), torch.randn(r, k) / 8, torch.randn(d, r) / 3, torch.randn(d))
    ours = [t.to(dtype).clone().requires_grad_() for t in (x, A, B, b)]
    ref = [t.double().clone().requires_grad_() for t in (x, A, B, b)]
    gy = torch.randn(5, 3, d)
    lx.lowrank_linear(*ours).backward(gy.to(dtype))
    (ref[0] @ (ref[2] @ ref[1]).T + ref[3]).backward(gy.double())
    tol = TOLERANCES[dtype]
    for mine, theirs in zip(ours, ref):
        scale = max(1.0, float(theirs.grad.abs().max()))
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=tol["rtol"],
                                   atol=tol["atol"] * scale * 4)


def test_only_requested_gradients_are_computed():
    x = torch.randn(4, 6)
    A = torch.randn(2, 6, requires_grad=True)
    B = torch.randn(3, 2)
    lx.lowrank_linear(x, A, B).sum().backward()
    assert A.grad is not None and x.grad is None and B.grad is None


def test_no_grad_mode_records_no_graph():
    A = torch.randn(2, 6, requires_grad=True)
    with torch.no_grad():
        y = lx.lowrank_linear(torch.randn(4, 6), A, torch.randn(3, 2))
    assert not y.requires_grad and y.grad_fn is None


def test_backward_saves_the_intermediate_not_a_dense_weight():
    """Saved tensors are x, A, B and the (..., r) intermediate: nothing of shape (d, k)."""
    M, k, r, d = 16, 40, 3, 50
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x, A, B, b = _leaf(M, k, dtype=torch.float32), _leaf(r, k, dtype=torch.float32), \
        _leaf(d, r, dtype=torch.float32), _leaf(d, dtype=torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lx.lowrank_linear(x, A, B, b)
    assert (d, k) not in saved and (k, d) not in saved
    assert sorted(saved) == sorted([(M, k), (r, k), (d, r), (M, r)])
    y.sum().backward()


def _half_backward(op, dtype, grad_of, M=64, k=64, r=8, d=48):
    """Gradients of op in `dtype` and in float64 from the same rounded inputs,
    with the dtypes of every matrix product the half-precision backward ran."""
    x, W, A, B, b = (torch.randn(M, k), torch.randn(d, k) / 8, torch.randn(r, k) / 8,
                     torch.randn(d, r) / 3, torch.randn(d))
    gy = torch.randn(M, d)

    def leaves(dt):
        out = [t.to(dtype).to(dt).clone() for t in (x, A, B, b)]
        for t, wanted in zip(out, grad_of):
            t.requires_grad_(wanted)
        return out

    def forward(dt, xl, Al, Bl, bl):
        Wd = W.to(dtype).to(dt)
        if op == "lowrank_linear":
            return lx.lowrank_linear(xl, Al, Bl, bl) if dt == dtype else xl @ (Bl @ Al).T + bl
        return lx.lora_linear(xl, Wd, Al, Bl, bl, scale=0.7) if dt == dtype \
            else xl @ (Wd + 0.7 * Bl @ Al).T + bl

    mine = leaves(dtype)
    y = forward(dtype, *mine)
    with product_dtypes() as seen:
        y.backward(gy.to(dtype))
    ref = leaves(torch.float64)
    forward(torch.float64, *ref).backward(gy.to(dtype).double())
    return [m.grad for m in mine], [rf.grad for rf in ref], seen


HALF_NAMES = {torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
@pytest.mark.parametrize("needs", ["all", "x", "A"])
def test_widened_half_backward_runs_its_products_in_float32(monkeypatch, dtype, op, needs):
    # Where ATen's half GEMM is slow (float16 without AVX512-FP16, bfloat16
    # without AVX512-BF16; LOWRANK_EXT_WIDEN_HALF=1 forces it here) the
    # compiled backward widens the operands it reads to float32 and rounds
    # each gradient once. No product may see a half operand, and the
    # gradients must match float64.
    if not lx.backend_info()["compiled"]:
        pytest.skip("the pure-torch fallback differentiates the half composition")
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", "1")
    grad_of = {"all": (True, True, True, True), "x": (True, False, False, False),
               "A": (False, True, False, False)}[needs]
    mine, ref, seen = _half_backward(op, dtype, grad_of)
    assert seen, "the backward ran no matrix product"
    assert HALF_NAMES[dtype] not in seen, f"a half product ran: {seen}"
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for m, rf in zip(mine, ref):
        if rf is None:
            assert m is None
            continue
        assert m.dtype == dtype
        scale = max(1.0, float(rf.abs().max()))
        torch.testing.assert_close(m.double(), rf, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_widen_half_switch_and_cpu_default(monkeypatch, dtype):
    if not lx.backend_info()["compiled"]:
        pytest.skip("the pure-torch fallback differentiates the half composition")
    grad_of = (True, True, True, True)
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", "0")
    *_, seen = _half_backward("lowrank_linear", dtype, grad_of)
    assert HALF_NAMES[dtype] in seen, "=0 must leave the products in the half type"
    monkeypatch.delenv("LOWRANK_EXT_WIDEN_HALF")
    *_, seen = _half_backward("lowrank_linear", dtype, grad_of)
    slow = float16_gemm_is_slow() if dtype == torch.float16 else bfloat16_gemm_is_slow()
    assert (HALF_NAMES[dtype] not in seen) == slow, (slow, seen)


@pytest.mark.parametrize("op", ["lowrank_linear_with_intermediate",
                                "lora_linear_with_intermediate"])
def test_the_forms_returning_the_intermediate_have_a_backward_through_both(op):
    # Called directly (torch.ops), gradients reach the inputs through y and
    # through t = x·Aᵀ, on both backends.
    x, W, A, B, b = _leaf(4, 6), _leaf(5, 6), _leaf(2, 6), _leaf(5, 2), _leaf(5)
    if op == "lowrank_linear_with_intermediate":
        def f(x, A, B, b):
            y, t = torch.ops.lowrank_ext.lowrank_linear_with_intermediate(x, A, B, b)
            return y.sum() + (t * t).sum()
        args = (x, A, B, b)
    else:
        def f(x, W, A, B, b):
            y, t = torch.ops.lowrank_ext.lora_linear_with_intermediate(x, W, A, B, b, 0.7)
            return y.sum() + (t * t).sum()
        args = (x, W, A, B, b)
    assert torch.autograd.gradcheck(f, args)
