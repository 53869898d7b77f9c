"""Precision rules: half-precision inputs accumulate in float32, including the
(..., r) intermediate, so an intermediate beyond float16's range (65504) does
not overflow when the final answer is representable."""

import pytest
import torch

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
    ref = [t.double().requires_grad_() for t in (x, W, A, B)]
    y = ref[0] @ ref[1].T + scale * (ref[0] @ ref[2].T) @ ref[3].T
    expected = torch.autograd.grad(y, ref, gy.double())
    for name, got, want in zip("xWAB", grads, expected):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=0, msg=name)
