"""Precision rules: half-precision inputs accumulate in float32, including the
(..., r) intermediate, so an intermediate beyond float16's range (65504) does
not overflow when the final answer is representable."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank_ext as lx
from lowrank_ext import _fallback


@pytest.mark.parametrize("fn", [lx.lowrank_linear, _fallback.lowrank_linear], ids=["api", "fallback"])
def test_float16_intermediate_beyond_range_gives_the_float32_answer(fn):
    k = 64
    x = torch.full((3, k), 40.0, dtype=torch.float16)
    A = torch.full((2, k), 40.0, dtype=torch.float16)          # t = 64·1600 = 102400 > 65504
    B = torch.full((5, 2), 2.0 ** -10, dtype=torch.float16)
    y = fn(x, A, B, None)
    expected = (x.float() @ A.float().T) @ B.float().T          # 200.0, representable
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), expected, rtol=1e-3, atol=0)


def test_float16_lora_adapter_beyond_range_gives_the_float32_answer():
    k = 64
    x = torch.full((2, k), 40.0, dtype=torch.float16)
    W = torch.zeros(4, k, dtype=torch.float16)
    A = torch.full((2, k), 40.0, dtype=torch.float16)
    B = torch.full((4, 2), 2.0 ** -10, dtype=torch.float16)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        y = fn(x, W, A, B, None, 0.5)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), torch.full((2, 4), 100.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize("rows", [1, 2, 64])  # the half path, the few-rows path, the half path
@pytest.mark.parametrize("scale", [1000.0, 1e-6, 1e-8])
def test_float16_lora_scale_is_not_folded_into_B(rows, scale):
    # B·scale would be 1e5 (past float16's 65504) or 1e-6 / 1e-8 (subnormal or
    # zero in float16); the answer itself is representable. peft scales B·(A·x).
    k = 64
    x = torch.full((rows, k), 1e-3 if scale > 1 else 1.0, dtype=torch.float16)
    W = torch.zeros(4, k, dtype=torch.float16)
    A = torch.full((2, k), 1.0 if scale > 1 else 100.0, dtype=torch.float16)
    B = torch.full((4, 2), 100.0 if scale > 1 else 1.0, dtype=torch.float16)
    expected = scale * (x.double() @ A.double().T) @ B.double().T
    for fn in (lx.lora_linear, _fallback.lora_linear):
        y = fn(x, W, A, B, None, scale)
        torch.testing.assert_close(y.double(), expected, rtol=2e-3, atol=0)


def _assert_finite_lora_grads(grads, x, W, A, B, scale, gy):
    """grads (of x, W, A, B) are finite and match lora_linear's in float64."""
    ref = [t.double().requires_grad_() for t in (x, W, A, B)]
    y = ref[0] @ ref[1].T + scale * (ref[0] @ ref[2].T) @ ref[3].T
    expected = torch.autograd.grad(y, ref, gy.double())
    for name, got, want in zip("xWAB", grads, expected):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=0, msg=name)


@pytest.mark.parametrize("rows", [2, 8, 64])  # the few-rows path and the half path
def test_float16_lora_backward_scales_before_the_adapter_products(rows):
    # gy·B is 80000 and gyᵀ·t 128000, past float16's 65504, but with scale
    # 1e-3 every gradient is representable; peft's composition scales gy first.
    k, d, r, scale = 8, 4, 2, 1e-3
    x = torch.full((rows, k), 5.0, dtype=torch.float16)
    W = torch.full((d, k), 0.01, dtype=torch.float16)
    A = torch.full((r, k), 5.0 * 64 / rows, dtype=torch.float16)
    B = torch.full((d, r), 2000.0, dtype=torch.float16)
    gy = torch.full((rows, d), 10.0, dtype=torch.float16)
    ins = [t.clone().requires_grad_() for t in (x, W, A, B)]
    grads = torch.autograd.grad(lx.lora_linear(*ins, None, scale), ins, gy)
    _assert_finite_lora_grads(grads, x, W, A, B, scale, gy)


# --- lora_linear in half types: dense product, bias and adapter rounded once --

@pytest.mark.parametrize("widen", ["0", "1"], ids=["half-gemm", "widened"])
@pytest.mark.parametrize("rows", [1, 2, 63, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["adapter-past-range", "cancelling"])
def test_half_lora_rounds_dense_bias_and_adapter_once(monkeypatch, case, dtype, rows, widen):
    # An adapter of 80000 before a scale of 0.01 (result 803), or a dense
    # product of 80000 cancelled by an adapter of -72000 (result 8003): the
    # compiled kernel rounded the dense product and the adapter to the half
    # type and added them there, giving inf and NaN in float16 and 4 % off in
    # bfloat16, where the fallback sums in float32 and rounds once.
    # LOWRANK_EXT_WIDEN_HALF picks the compiled dense product: the half
    # type's GEMM or a float32 one (cpu/half_gemm.h); 2-63 rows may stream.
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", widen)
    k = 8
    if case == "cancelling":
        x, W, B, scale = torch.full((rows, k), 100.0), torch.full((4, k), 100.0), -90.0, 1.0
    else:
        x, W, B, scale = torch.full((rows, k), 50.0), torch.zeros(4, k), 200.0, 0.01
    x, W = x.to(dtype), W.to(dtype)
    A = torch.ones(1, k, dtype=dtype)
    B = torch.full((4, 1), B, dtype=dtype)
    bias = torch.full((4,), 3.0, dtype=dtype)
    ref = (x.double() @ W.double().T + bias.double()
           + scale * (x.double() @ A.double().T) @ B.double().T)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        y = fn(x, W, A, B, bias, scale)
        torch.testing.assert_close(y.double(), ref, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("widen", ["0", "1"], ids=["half-gemm", "widened"])
@pytest.mark.parametrize("rows", [1, 3, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_lora_keeps_the_digits_of_a_cancelling_result(monkeypatch, dtype, rows, widen):
    # W ≈ -scale·B·A: the dense product and the adapter cancel to about 1 %
    # of either, so rounding either to the half type first is off by many
    # units in the last place of the result.
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", widen)
    g = torch.Generator().manual_seed(0)
    k, r, d, scale = 32, 4, 16, 0.5
    x, A, B = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
               for s in ((rows, k), (r, k), (d, r)))
    noise = 0.01 * torch.randn(d, k, generator=g, dtype=torch.float64)
    W = (-scale * B.double() @ A.double() + noise).to(dtype)
    bias = (0.01 * torch.randn(d, generator=g, dtype=torch.float64)).to(dtype)
    ref = (x.double() @ W.double().T + bias.double()
           + scale * (x.double() @ A.double().T) @ B.double().T)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        y = fn(x, W, A, B, bias, scale)
        torch.testing.assert_close(y.double(), ref, rtol=2 * torch.finfo(dtype).eps,
                                   atol=1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("rows", [1, 4, 100])  # one row, the few-rows branch, a GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("scale", [1e39, 1e-50, 0.0])
def test_lora_scale_acts_in_the_dtype_of_the_products(scale, dtype, rows):
    # scale multiplies the adapter in the dtype its products run in (float32
    # for the half types), as in the composition scale * (x·Aᵀ)·Bᵀ: past
    # float32's range 1e39 is inf there (inf·0 = NaN), and 1e-50 is 0, whose
    # product with the NaN in B is NaN. The compiled kernel raised for 1e39
    # (ATen's alpha, naming no argument) and dropped the NaN for 1e-50 (BLAS
    # skips a product whose alpha is 0).
    x = torch.ones(rows, 4, dtype=dtype)
    W = torch.ones(3, 4, dtype=dtype)
    A = torch.ones(2, 4, dtype=dtype)
    B = torch.tensor([[math.nan, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=acc).double()
    ref = x.double() @ W.double().T + s * ((x.double() @ A.double().T) @ B.double().T)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        torch.testing.assert_close(fn(x, W, A, B, None, scale), ref.to(dtype), equal_nan=True)


@pytest.mark.parametrize("rows", [1, 4, 100])  # one row, the few-rows branch, a GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_a_huge_scale_multiplies_the_adapter_product_not_an_operand(dtype, rows):
    # t = x·Aᵀ is 1e10 and the scale 1e30 (both 1e200 in float64), so scale·t
    # is past the dtype's range, but scale·(t·Bᵀ) is 0 and 2e30 (2e300): MKL,
    # given the scale as its alpha, multiplied t first and gave NaN and inf.
    big, scale, result = (1e200, 1e200, 2e300) if dtype == torch.float64 else (1e10, 1e30, 2e30)
    # 64 outputs: MKL multiplied t by its alpha from about that size.
    x = torch.ones(rows, 2, dtype=dtype)
    W = torch.zeros(64, 2, dtype=dtype)
    A = torch.full((2, 2), big / 2, dtype=dtype)
    B = torch.zeros(64, 2, dtype=dtype)
    B[0] = torch.tensor([1.0, -1.0])
    B[1, 0] = result / (big * scale)
    ref = x.double() @ W.double().T + scale * ((x.double() @ A.double().T) @ B.double().T)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        y = fn(x, W, A, B, None, scale)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=0)


@pytest.mark.parametrize("rows", [1, 4, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("big_operand", ["t", "B"])
def test_a_scale_of_two_takes_no_operand_past_the_range(big_operand, dtype, rows):
    # t = x·Aᵀ (or B) near the dtype's largest value and a scale of 2: MKL,
    # given 2 as its alpha, doubled the operand to inf before the product and
    # gave inf and NaN where scale·(t·Bᵀ) is 0, and big (or big / 2).
    big = torch.finfo(dtype).max / 2 ** 0.5
    big_t = big_operand == "t"
    x = torch.ones(rows, 2, dtype=dtype)
    W = torch.zeros(64, 2, dtype=dtype)
    A = torch.full((2, 2), big / 2 if big_t else 0.125, dtype=dtype)   # t = big or 0.25
    B = torch.zeros(64, 2, dtype=dtype)
    B[0] = torch.tensor([1.0, -1.0], dtype=torch.float64) * (1 if big_t else big)
    B[1, 0] = 0.5 if big_t else big
    ref = 2.0 * ((x.double() @ A.double().T) @ B.double().T)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        y = fn(x, W, A, B, None, 2.0)
        assert y[:, 0].eq(0).all() and torch.isfinite(y).all(), y[0, :2]
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=0)


@pytest.mark.parametrize("rows", [1, 4, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_scale_below_one_leaves_an_adapter_product_past_the_range_inf(dtype, rows):
    # t·Bᵀ is twice big, past the dtype's range, so the composition's
    # scale·(t·Bᵀ) is inf for a scale of 0.5: MKL, given 0.5 as its alpha,
    # halved an operand first and returned a finite value.
    big = torch.finfo(dtype).max / 2 ** 0.5
    x = torch.ones(rows, 2, dtype=dtype)
    W = torch.zeros(64, 2, dtype=dtype)
    A = torch.full((1, 2), big / 2, dtype=dtype)               # t = big
    B = torch.zeros(64, 1, dtype=dtype)
    B[0], B[1] = 2.0, 0.5
    composition = F.linear(x, W) + 0.5 * F.linear(F.linear(x, A), B)
    assert composition[:, 0].eq(math.inf).all()
    for fn in (lx.lora_linear, _fallback.lora_linear):
        y = fn(x, W, A, B, None, 0.5)
        torch.testing.assert_close(y, composition, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [1, 4, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_scale_below_one_keeps_the_digits_of_a_subnormal_intermediate(dtype, rows):
    # t = x·Aᵀ is subnormal, B huge, the result normal: MKL, given the scale
    # of 1e-3 as its alpha, multiplied t first, into fewer digits (the result
    # came out twice the exact one).
    t_exp, b_exp = (-140, 100) if dtype == torch.float32 else (-1060, 1000)
    x = torch.ones(rows, 1, dtype=dtype)
    W = torch.zeros(64, 1, dtype=dtype)
    A = torch.full((1, 1), 2.0 ** t_exp, dtype=dtype)
    B = torch.full((64, 1), 2.0 ** b_exp, dtype=dtype)
    exact = torch.full((rows, 64), 1e-3 * 2.0 ** (t_exp + b_exp), dtype=torch.float64)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        torch.testing.assert_close(fn(x, W, A, B, None, 1e-3).double(), exact,
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [4, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [0.0, 1e-3])
def test_lora_backward_scales_before_the_adapter_products(scale, dtype, rows):
    # gy·B and gyᵀ·t are past the dtype's range, but the composition's
    # gradients ((scale·gy)·B, (scale·gy)ᵀ·t) are 0 for a scale of 0 (a
    # disabled adapter) and finite for 1e-3: scaling the products after gave
    # inf·0 = NaN and inf.
    big = torch.finfo(dtype).max * 0.75
    x = torch.ones(rows, 1, dtype=dtype, requires_grad=True)
    W = torch.zeros(2, 1, dtype=dtype)
    A = torch.ones(1, 1, dtype=dtype, requires_grad=True)
    B = torch.ones(2, 1, dtype=dtype, requires_grad=True)
    gy = torch.full((rows, 2), big, dtype=dtype)
    grads = torch.autograd.grad(lx.lora_linear(x, W, A, B, None, scale), (x, A, B), gy)
    ref = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y = ref[0] @ W.double().T + scale * ((ref[0] @ ref[1].T) @ ref[2].T)
    expected = torch.autograd.grad(y, ref, gy.double())
    for name, got, want in zip("xAB", grads, expected):
        assert torch.isfinite(got).all(), (name, got)
        torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=0, msg=name)


@pytest.mark.parametrize("rows", [4, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("big", ["B", "t"])
def test_lora_backward_with_a_scale_above_one_leaves_a_large_factor_finite(big, dtype, rows):
    # B (or t = x·Aᵀ) is 0.75 of the dtype's largest value, so 2·B (2·t) is
    # inf, while the composition's (2·gy)·B for a small gy is finite: a
    # scale above 1 multiplies the products, not the factor.
    huge = torch.finfo(dtype).max * 0.75
    x = torch.ones(rows, 1, dtype=dtype, requires_grad=True)
    W = torch.zeros(2, 1, dtype=dtype)
    A = torch.full((1, 1), 1e-30 if big == "B" else huge, dtype=dtype, requires_grad=True)
    B = torch.full((2, 1), huge if big == "B" else 1e-30, dtype=dtype, requires_grad=True)
    gy = torch.full((rows, 2), 1e-3, dtype=dtype)
    grads = torch.autograd.grad(lx.lora_linear(x, W, A, B, None, 2.0), (x, A, B), gy)
    ref = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y = ref[0] @ W.double().T + 2.0 * ((ref[0] @ ref[1].T) @ ref[2].T)
    expected = torch.autograd.grad(y, ref, gy.double())
    for name, got, want in zip("xAB", grads, expected):
        if not torch.isfinite(want.to(dtype)).all():
            continue  # past the dtype's range in exact arithmetic too
        assert torch.isfinite(got).all(), (name, got)
        torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=0, msg=name)


@pytest.mark.parametrize("rows", [1, 200])
@pytest.mark.parametrize("dtype, scale, gy, b", [
    (torch.float32, 1e-3, 1e30, 1.2345678e-37),
    (torch.float32, 1e3, 1e-20, 1.2345678e-21),
    (torch.float64, 1e-3, 1e300, 1.2345678901234567e-306),
    (torch.float64, 1e3, 1e-160, 1.2345678901234567e-150),
    (torch.bfloat16, 1e-3, 1e30, 1.2345678e-37),
], ids=["f32-small", "f32-large", "f64-small", "f64-large", "bf16-small"])
def test_lora_backward_scales_gy_as_the_composition_does(dtype, scale, gy, b, rows):
    # The composition forms (scale·gy)·B: scaling B into the subnormals first
    # (a small scale), or multiplying a subnormal gy·B back by a large one,
    # lost digits the composition keeps (bfloat16 26 % off).
    x = torch.ones(rows, 1, dtype=dtype)
    W = torch.zeros(1, 1, dtype=dtype)
    A = torch.ones(1, 1, dtype=dtype, requires_grad=True)
    B = torch.full((1, 1), b, dtype=dtype, requires_grad=True)
    g = torch.full((rows, 1), gy, dtype=dtype)
    ours = torch.autograd.grad(lx.lora_linear(x, W, A, B, None, scale), (A,), g)[0]
    composition = torch.autograd.grad(
        F.linear(x, W) + scale * F.linear(F.linear(x, A), B), (A,), g)[0]
    exact = (scale * g.double() * B.detach().double()).sum()
    torch.testing.assert_close(ours.double().squeeze(), exact, rtol=2 ** -7, atol=0)
    torch.testing.assert_close(ours, composition, rtol=1e-6 if dtype != torch.bfloat16 else 2 ** -7,
                               atol=0)


@pytest.mark.parametrize("scale", [0.0, 1e-3])
def test_a_compiled_layer_with_a_new_scale_scales_before_the_adapter_products(scale):
    # A LoRALinear whose scale is set anew runs, under torch.compile, a
    # composition with the scale outside the op: it folded the scale into B,
    # whose gradient then scaled gyᵀ·t after the product (NaN for a scale of
    # 0, inf for 1e-3, where gyᵀ·t overflows), as eager mode no longer does.
    huge = torch.finfo(torch.float32).max * 0.75
    layer = lx.LoRALinear(nn.Linear(1, 2, bias=False), 1)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.A.fill_(1.0)
        layer.B.fill_(1.0)
    layer.scale = scale
    x, gy = torch.ones(4, 1), torch.full((4, 2), huge)
    grads = []
    for run in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        layer.zero_grad()
        run(x).backward(gy)
        grads.append(layer.B.grad.clone())
    expected = scale * gy.double().sum(0, keepdim=True).T  # (scale·gy)ᵀ·t, t = 1
    for got in grads:
        assert torch.isfinite(got).all(), got
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kernel", ["auto", "avx2", "portable"])
@pytest.mark.parametrize("rows", [4, 40, 100])
def test_bfloat16_lora_adapter_past_the_range_gives_the_float32_answer(kernel, rows):
    # The adapter term (bias + scale·(x·Aᵀ)·Bᵀ = 3.3e38 + 1e36) rounds to inf
    # in bfloat16, the dense product (-1e38) brings the result back into range:
    # from 33 rows, where the term went to bfloat16's GEMM as its C, the
    # compiled kernel gave inf; summed in float32 it is 2.3e38.
    if not lx.backend_info()["compiled"]:
        pytest.skip("kernel sets are the compiled backend's")
    previous = torch.ops.lowrank_ext._cpu_kernel("")
    torch.ops.lowrank_ext._cpu_kernel(kernel)
    try:
        dt = torch.bfloat16
        x = torch.ones(rows, 2, dtype=dt)
        W = torch.full((3, 2), -5e37, dtype=dt)
        A = torch.ones(1, 2, dtype=dt)
        B = torch.full((3, 1), torch.finfo(dt).max / 2, dtype=dt)
        bias = torch.full((3,), 1e36, dtype=dt)
        ref = x.double() @ W.double().T + bias.double() + (x.double() @ A.double().T) @ B.double().T
        for fn in (lx.lora_linear, _fallback.lora_linear):
            y = fn(x, W, A, B, bias, 1.0)
            assert torch.isfinite(y).all(), y
            torch.testing.assert_close(y.double(), ref, rtol=2 ** -7, atol=0)
    finally:
        torch.ops.lowrank_ext._cpu_kernel({"avx512bf16": "auto"}.get(previous, previous))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16,
                                   torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_an_empty_adapter_still_takes_a_scale_past_float32(dtype, rows):
    # With r = 0 the adapter is a sum of no terms, 0; a scale of 1e39 is inf
    # in float32 and inf·0 is NaN, as the composition gives: the compiled
    # kernel skipped the empty adapter on some paths.
    x = torch.ones(rows, 4, dtype=dtype)
    W = torch.ones(3, 4, dtype=dtype)
    A, B = torch.ones(0, 4, dtype=dtype), torch.ones(3, 0, dtype=dtype)
    scale = 1e39
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=acc).double()
    ref = x.double() @ W.double().T + s * torch.zeros(rows, 3, dtype=torch.float64)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        torch.testing.assert_close(fn(x, W, A, B, None, scale), ref.to(dtype), equal_nan=True)


# --- float16 backward of lowrank_linear: gt = gy·B in float32 ------------------

@pytest.mark.parametrize("widen", ["0", "1"], ids=["half-gemm", "widened"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 128), (64, 64, 4, 128), (1536, 8, 2, 128)],
                         ids=str)  # 1536 rows: where the CPU fuses gx = (gy·B)·A
@pytest.mark.parametrize("form", ["op", "with_intermediate", "func"])
def test_float16_lowrank_backward_forms_gy_B_in_float32(monkeypatch, form, shape, widen):
    # gt = gy·B is 128000, past float16's 65504, while gx (4000 or 8000) and
    # gA (12.8 per row) are representable: gt rounded to float16 made both inf.
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", widen)
    M, k, r, d = shape
    x = torch.full((M, k), 1e-4, dtype=torch.float16)
    A = torch.full((r, k), 2.0 ** -6, dtype=torch.float16)
    B = torch.full((d, r), 1000.0, dtype=torch.float16)
    gy = torch.ones(M, d, dtype=torch.float16)
    if form == "func":
        _, vjp = torch.func.vjp(lambda *a: lx.lowrank_linear(*a, None), x, A, B)
        grads = vjp(gy)
    else:
        ins = [t.clone().requires_grad_() for t in (x, A, B)]
        if form == "op":
            y = lx.lowrank_linear(*ins, None)
        else:
            y = torch.ops.lowrank_ext.lowrank_linear_with_intermediate(*ins, None)[0]
        grads = torch.autograd.grad(y, ins, gy)
    ref = [t.double().requires_grad_() for t in (x, A, B)]
    expected = torch.autograd.grad((ref[0] @ ref[1].T) @ ref[2].T, ref, gy.double())
    for name, got, want in zip("xAB", grads, expected):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=0, msg=name)


@pytest.mark.parametrize("widen", ["0", "1"], ids=["half-gemm", "widened"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 128), (64, 64, 4, 128)], ids=str)
@pytest.mark.parametrize("form", ["op", "with_intermediate", "func"])
@pytest.mark.parametrize("scale", [1.0, 2.0])  # no scale below 1 to save gy·B
def test_float16_lora_backward_forms_gy_B_in_float32(monkeypatch, form, shape, widen, scale):
    # As for lowrank_linear: scale·gy·B is 128000·scale, past 65504, while
    # gx and gA are representable (gx was inf, gA NaN on the compiled backend).
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", widen)
    M, k, r, d = shape
    x = torch.full((M, k), 1e-4, dtype=torch.float16)
    W = torch.full((d, k), 1e-3, dtype=torch.float16)
    A = torch.full((r, k), 2.0 ** -6, dtype=torch.float16)
    B = torch.full((d, r), 1000.0, dtype=torch.float16)
    gy = torch.ones(M, d, dtype=torch.float16)
    if form == "func":
        _, vjp = torch.func.vjp(lambda *a: lx.lora_linear(*a, None, scale), x, W, A, B)
        grads = vjp(gy)
    else:
        ins = [t.clone().requires_grad_() for t in (x, W, A, B)]
        if form == "op":
            y = lx.lora_linear(*ins, None, scale)
        else:
            y = torch.ops.lowrank_ext.lora_linear_with_intermediate(*ins, None, scale)[0]
        grads = torch.autograd.grad(y, ins, gy)
    _assert_finite_lora_grads(grads, x, W, A, B, scale, gy)


@pytest.mark.parametrize("widen", ["0", "1"], ids=["half-gemm", "widened"])
@pytest.mark.parametrize("kernel", ["auto", "portable"])
@pytest.mark.parametrize("rows", [2, 40])
@pytest.mark.parametrize("scale", [0.5, 0.0])
def test_half_lora_on_a_wide_layer_adds_the_bias_to_every_row(monkeypatch, widen, kernel,
                                                             rows, scale):
    # Past 131072 outputs each block of rows is one row: the float32 copy of
    # the bias was the one-row C itself, the adapter was added into it, and
    # every later row started from that instead of the bias (4 off in 4).
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", widen)
    compiled = lx.backend_info()["compiled"]
    if compiled:
        previous = torch.ops.lowrank_ext._cpu_kernel("")
        torch.ops.lowrank_ext._cpu_kernel(kernel)
    try:
        g = torch.Generator().manual_seed(0)
        k, r, d, dt = 3, 2, 131073, torch.bfloat16
        x, W, A, B, bias = (torch.randn(*s, generator=g).to(dt)
                            for s in ((rows, k), (d, k), (r, k), (d, r), (d,)))
        before = bias.clone()
        ref = (x.double() @ (W.double() + scale * B.double() @ A.double()).T
               + bias.double())
        for fn in (lx.lora_linear, _fallback.lora_linear):
            y = fn(x, W, A, B, bias, scale)
            torch.testing.assert_close(y.double(), ref, rtol=2 ** -7, atol=2 ** -7)
        assert torch.equal(bias, before)
    finally:
        if compiled:
            torch.ops.lowrank_ext._cpu_kernel({"avx512bf16": "auto"}.get(previous, previous))


def test_no_features_still_multiply_b():
    # k = 0: t = x·Aᵀ is zero, and t·Bᵀ is NaN where a row of B holds Inf or
    # NaN (0·Inf), as the op's definition and lora_linear give it; the
    # compiled kernel wrote the bias alone there.
    x, A = torch.ones(2, 0, dtype=torch.float64), torch.ones(3, 0, dtype=torch.float64)
    B = torch.tensor([[math.inf, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    bias = torch.tensor([0.5, 0.25], dtype=torch.float64)
    expected = torch.zeros(2, 3, dtype=torch.float64) @ B.T + bias
    assert expected[:, 0].isnan().all() and (expected[:, 1] == 0.25).all()
    for fn in (lx.lowrank_linear, _fallback.lowrank_linear):
        torch.testing.assert_close(fn(x, A, B, bias), expected, equal_nan=True)
        torch.testing.assert_close(fn(x, A, B, None), expected - bias, equal_nan=True)
    W = torch.ones(2, 0, dtype=torch.float64)
    for fn in (lx.lora_linear, _fallback.lora_linear):
        torch.testing.assert_close(fn(x, W, A, B, bias, 1.0), expected, equal_nan=True)


@pytest.mark.parametrize("rows", [16, 1600])
def test_no_outputs_still_multiply_a_in_the_gradient(rows):
    # d = 0: gx = (gy·B)·A with gy·B zero is NaN where A holds Inf; from 1536
    # rows the compiled backward (one fused pass, k' = d = 0) gave zeros.
    x = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)
    A = torch.ones(2, 4, dtype=torch.float64)
    A[0, 0] = math.inf
    B = torch.ones(0, 2, dtype=torch.float64)
    lx.lowrank_linear(x, A, B, None).sum().backward()
    expected = torch.zeros(rows, 2, dtype=torch.float64) @ A
    torch.testing.assert_close(x.grad, expected, equal_nan=True)
    assert x.grad[:, 0].isnan().all()


def _lora_grads_float64(x, W, A, B, bias, scale, gy):
    """The gradients of x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ, in float64 by autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (x, W, A, B)]
    xd, Wd, Ad, Bd = leaves
    y = xd @ Wd.T + scale * (xd @ Ad.T) @ Bd.T
    if bias is not None:
        y = y + bias.double()
    y.backward(gy.double())
    return [t.grad for t in leaves]


@pytest.mark.parametrize("widen", ["0", "1"], ids=["half-gemm", "widened"])
@pytest.mark.parametrize("rows", [4, 32, 100])
def test_float16_lora_gradient_of_b_keeps_its_digits_for_a_small_scale(monkeypatch, widen,
                                                                       rows):
    # scale·gy was formed in float16 (as peft's composition forms it): with a
    # scale of 1e-4 and gradients of 1e-4 it underflowed to zero, and with
    # 1/16 and N(0, 1e-4) gradients it lost digits to subnormals.
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", widen)
    h = torch.float16
    g = torch.Generator().manual_seed(0)
    k, d, r = 16, 8, 4
    for scale, gy_size in ((1e-4, 1e-4), (1 / 16, 1e-4)):
        x = torch.randn(rows, k, generator=g).mul(8).to(h)
        W = torch.randn(d, k, generator=g).to(h)
        A = torch.randn(r, k, generator=g).to(h)
        B = torch.randn(d, r, generator=g).to(h).requires_grad_()
        gy = (torch.randn(rows, d, generator=g) * gy_size).to(h)
        expected = _lora_grads_float64(x, W, A, B, None, scale, gy)[3]
        # The saved t = x·Aᵀ is rounded to float16 (2^-11 of each |t|), then
        # the result once (2^-11 of it, or a subnormal's spacing 2^-24).
        t = (x.double() @ A.double().T).abs()
        bound = (2 ** -10 * scale * (gy.double().abs().T @ t) + 2 ** -11 * expected.abs()
                 + 2 ** -24)
        for fn in (lx.lora_linear, _fallback_lora_through_the_backend):
            B.grad = None
            fn(x, W, A, B, None, scale).backward(gy)
            error = (B.grad.double() - expected).abs()
            assert (error <= bound).all(), (error / bound).max()


def _fallback_lora_through_the_backend(x, W, A, B, bias, scale):
    """The pure-torch backend's autograd (_library's Python Function), on any build."""
    from lowrank_ext._library import _LoRALinearFunction
    return _LoRALinearFunction.apply(x, W, A, B, bias, scale)


@pytest.mark.parametrize("widen", ["0", "1"], ids=["half-gemm", "widened"])
@pytest.mark.parametrize("contiguous_w", [True, False])
@pytest.mark.parametrize("rows", [1, 64])
def test_float16_lora_gradient_of_x_survives_a_cancelled_dense_overflow(monkeypatch, widen,
                                                                        contiguous_w, rows):
    # gy·W = 6e4 + 6e4 overflows float16 where the adapter's -1.2e5 brings gx
    # back to 0: the dense product was rounded to float16 (inf) first.
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", widen)
    h = torch.float16
    x = torch.ones(rows, 2, dtype=h, requires_grad=True)
    W = torch.tensor([[6e4, 0.0], [6e4, 0.0]], dtype=h)
    if not contiguous_w:
        W = W.t().contiguous().t()
    A = torch.tensor([[1.0, 0.0]], dtype=h)
    B = torch.full((2, 1), -6e4, dtype=h)
    gy = torch.ones(rows, 2, dtype=h)
    expected = _lora_grads_float64(x, W, A, B, None, 1.0, gy)[0]
    for fn in (lx.lora_linear, _fallback_lora_through_the_backend):
        x.grad = None
        fn(x, W, A, B, None, 1.0).backward(gy)
        torch.testing.assert_close(x.grad.double(), expected)


@pytest.mark.parametrize("kernel", ["auto", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_bias_is_added_after_the_product_at_every_row_count(kernel, dtype):
    # t·Bᵀ = 1e38 − 1e38 = 0 plus a bias of 3e38: the panel expand (8 rows and
    # more) started its sums from the bias and overflowed to inf, where fewer
    # rows, the portable kernels and the fallback give 3e38.
    compiled = lx.backend_info()["compiled"]
    if compiled:
        previous = torch.ops.lowrank_ext._cpu_kernel("")
        torch.ops.lowrank_ext._cpu_kernel(kernel)
    try:
        k = 4
        A = torch.full((2, k), 0.25, dtype=dtype)  # t = [1, 1]
        B = torch.tensor([[1e38, -1e38]] * 20, dtype=dtype)  # 20 outputs: a partial panel too
        bias = torch.full((20,), 3e38, dtype=dtype)
        expected = bias.double()
        for rows in (1, 7, 8, 64):
            x = torch.ones(rows, k, dtype=dtype)
            for fn in (lx.lowrank_linear, _fallback.lowrank_linear):
                y = fn(x, A, B, bias)
                assert torch.isfinite(y).all(), (fn, rows)
                torch.testing.assert_close(y.double(), expected.expand(rows, -1),
                                           rtol=torch.finfo(dtype).eps, atol=0)
    finally:
        if compiled:
            torch.ops.lowrank_ext._cpu_kernel({"avx512bf16": "auto"}.get(previous, previous))


@pytest.mark.parametrize("widen", ["0", "1"], ids=["half-gemm", "widened"])
@pytest.mark.parametrize("dtype, rows", [(torch.float32, 1), (torch.float32, 128),
                                         (torch.float32, 129), (torch.bfloat16, 2),
                                         (torch.bfloat16, 64), (torch.bfloat16, 300)], ids=str)
def test_lora_adds_dense_bias_then_adapter_on_every_branch(monkeypatch, widen, dtype, rows):
    # x·Wᵀ = 3e38, bias = −3e38, adapter = 1e38: summed in the fallback's
    # order (x·Wᵀ + bias) + adapter the result is 1e38; the few-rows branch
    # added the adapter first and gave inf, depending on the row count.
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", widen)
    big, k = 3.0e38, 4
    x = torch.ones(rows, k, dtype=dtype)
    W = torch.full((2, k), big / k, dtype=dtype)
    bias = torch.full((2,), -big, dtype=dtype)
    A = torch.full((1, k), 1.0 / k, dtype=dtype)
    B = torch.full((2, 1), 1.0e38, dtype=dtype)
    expected = _fallback.lora_linear(x, W, A, B, bias, 1.0)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(lx.lora_linear(x, W, A, B, bias, 1.0), expected, rtol=0, atol=0)
