"""lowrank_linear and lora_linear against the float64 dense reference."""

import pytest
import torch

import lowrank_ext as lx
from lowrank_ext import _fallback
from conftest import DTYPES, requires_compiled
from reference import assert_close_to_reference, lora_reference, lowrank_reference, product_dtypes

ops = torch.ops.lowrank_ext

# (leading dims of x, k, r, d): the seed's shape first; then batches, zero-size
# batches, tails, r = min(d, k), and shapes reaching every CPU kernel branch
# (single row, many rows through BLAS, one wide row split across threads).
SHAPES = [
    ((), 10, 2, 10),
    ((1,), 10, 2, 10),
    ((5,), 10, 2, 10),
    ((2, 3), 7, 3, 5),
    ((0,), 8, 2, 4),
    ((3, 0, 2), 8, 2, 4),
    ((4,), 6, 6, 9),
    ((4,), 9, 4, 4),
    ((17,), 33, 1, 65),
    ((100,), 256, 16, 256),
    ((130,), 129, 17, 131),
    ((1,), 2048, 16, 2048),
    ((3,), 2048, 16, 1000),
]


def make_inputs(lead, k, r, d, dtype, bias=True, device="cpu"):
    x = torch.randn(*lead, k, dtype=dtype, device=device)
    A = (torch.randn(r, k, dtype=dtype, device=device) / k ** 0.5)
    B = (torch.randn(d, r, dtype=dtype, device=device) / max(r, 1) ** 0.5)
    b = torch.randn(d, dtype=dtype, device=device) if bias else None
    return x, A, B, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lowrank_linear_matches_dense_reference(shape, dtype, bias):
    x, A, B, b = make_inputs(*shape, dtype, bias)
    originals = [t.clone() for t in (x, A, B) + ((b,) if bias else ())]
    y = lx.lowrank_linear(x, A, B, b)
    assert_close_to_reference(y, lowrank_reference(x, A, B, b), dtype)
    for before, after in zip(originals, (x, A, B, b)):
        assert torch.equal(before, after), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:8], ids=str)
def test_entry_points_agree(shape, dtype):
    """Public wrapper, torch.ops and the pure-torch kernel give the same answer."""
    x, A, B, b = make_inputs(*shape, dtype)
    y = lx.lowrank_linear(x, A, B, b)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(ops.lowrank_linear(x, A, B, b), y, **tol)
    torch.testing.assert_close(_fallback.lowrank_linear(x, A, B, b), y, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_with_intermediate_returns_x_times_A_transposed(dtype):
    x, A, B, b = make_inputs((4, 3), 20, 5, 12, dtype)
    y, t = ops.lowrank_linear_with_intermediate(x, A, B, b)
    assert t.shape == (4, 3, 5) and t.dtype == dtype
    assert_close_to_reference(t, x.double() @ A.double().T, dtype)
    assert_close_to_reference(y, lowrank_reference(x, A, B, b), dtype)


def test_rank_zero_and_empty_features_give_the_bias():
    x = torch.randn(3, 4)
    y = lx.lowrank_linear(x, torch.empty(0, 4), torch.empty(5, 0), torch.arange(5.0))
    torch.testing.assert_close(y, torch.arange(5.0).expand(3, 5))
    y = lx.lowrank_linear(torch.randn(3, 0), torch.empty(2, 0), torch.randn(5, 2))
    torch.testing.assert_close(y, torch.zeros(3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_non_contiguous_and_broadcast_inputs(dtype):
    k, r, d = 24, 4, 16
    x = torch.randn(k, 6, dtype=dtype).T                      # transposed view
    A = torch.randn(k, r, dtype=dtype).T                      # column-major A
    B = torch.randn(r, d, dtype=dtype).T                      # column-major B
    b = torch.randn(2 * d, dtype=dtype)[::2]                  # strided bias
    assert not (x.is_contiguous() or A.is_contiguous() or B.is_contiguous() or b.is_contiguous())
    assert_close_to_reference(lx.lowrank_linear(x, A, B, b), lowrank_reference(x, A, B, b), dtype)

    row = torch.randn(1, k, dtype=dtype)
    x0 = row.expand(40, k)                                    # stride-0 rows
    assert x0.stride(0) == 0
    assert_close_to_reference(lx.lowrank_linear(x0, A, B, b), lowrank_reference(x0, A, B, b), dtype)
    x_slice = torch.randn(8, 2 * k, dtype=dtype)[:, :k]       # padded row stride
    assert_close_to_reference(lx.lowrank_linear(x_slice, A, B), lowrank_reference(x_slice, A, B), dtype)


def test_half_types_accumulate_in_float32():
    # 4096 terms of 1.0 + tiny: float16 accumulation would lose the tail; the
    # answer is exactly representable in float16.
    k = 4096
    x = torch.ones(2, k, dtype=torch.float16)
    A = torch.full((1, k), 2.0 ** -6, dtype=torch.float16)
    B = torch.ones(3, 1, dtype=torch.float16)
    y = lx.lowrank_linear(x, A, B)
    assert torch.equal(y, torch.full((2, 3), 64.0, dtype=torch.float16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((), 10, 2, 10), ((3, 4), 16, 4, 12), ((0,), 8, 2, 8),
                                   ((70,), 96, 8, 80)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lora_linear_matches_dense_reference(shape, dtype, bias):
    lead, k, r, d = shape
    x, A, B, b = make_inputs(lead, k, r, d, dtype, bias)
    W = torch.randn(d, k, dtype=dtype) / k ** 0.5
    y = lx.lora_linear(x, W, A, B, b, scale=0.5)
    assert_close_to_reference(y, lora_reference(x, W, A, B, b, 0.5), dtype)
    y2, t = ops.lora_linear_with_intermediate(x, W, A, B, b, 0.5)
    torch.testing.assert_close(y2, y)
    assert_close_to_reference(t, x.double() @ A.double().T, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [4, 200])
def test_lora_linear_with_scale_zero_propagates_a_non_finite_adapter(M, dtype):
    # scale = 0 multiplies the adapter by zero, as the composition does: a
    # NaN or inf in A gives NaN, on every path (BLAS's alpha = 0 used to skip
    # the product at float32/float64 and at a few rows).
    x, A, B, b = make_inputs((M,), 8, 3, 5, dtype, True)
    W = torch.randn(5, 8, dtype=dtype)
    for value in (float("nan"), float("inf")):
        A_bad = A.clone()
        A_bad[0, 0] = value
        assert lx.lora_linear(x, W, A_bad, B, b, 0.0).isnan().all()
    y = lx.lora_linear(x, W, A, B, b, 0.0)
    assert_close_to_reference(y, lora_reference(x, W, A, B, b, 0.0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x", [torch.randn(1, 4).t(), torch.randn(1, 2)[:, ::2],
                               torch.randn(3, 1).expand(3, 1)],
                         ids=["column", "strided1x1", "expanded"])
def test_ops_take_a_single_input_feature_with_any_stride(x, dtype):
    # k = 1: the column stride is meaningless (torch calls such tensors
    # contiguous whatever it is); the few-row kernels must not refuse them.
    x = x.to(dtype)
    _, A, B, b = make_inputs((1,), 1, 3, 5, dtype, True)
    W = torch.randn(5, 1, dtype=dtype)
    assert_close_to_reference(lx.lora_linear(x, W, A, B, b, 0.5),
                              lora_reference(x, W, A, B, b, 0.5), dtype)
    assert_close_to_reference(lx.lowrank_linear(x, A, B, b), lowrank_reference(x, A, B, b),
                              dtype)


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_half_dense_product_runs_in_float32_from_64_rows(monkeypatch, dtype):
    # Where ATen's half GEMM is slow (LOWRANK_EXT_WIDEN_HALF=1 forces it here),
    # from 64 rows (where W's float32 copy pays for itself) the compiled
    # lora_linear multiplies by W in float32 and rounds once.
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", "1")
    x, A, B, b = make_inputs((64,), 96, 8, 80, dtype, True)
    W = torch.randn(80, 96, dtype=dtype) / 96 ** 0.5
    with product_dtypes() as seen:
        y = lx.lora_linear(x, W, A, B, b, scale=0.5)
    assert seen and "c10::Half" not in seen and "c10::BFloat16" not in seen, seen
    assert_close_to_reference(y, lora_reference(x, W, A, B, b, 0.5), dtype)


@requires_compiled
def test_fast_entry_defers_to_torch_function_subclasses():
    """A tensor subclass with __torch_function__ still sees the call."""
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x, A, B, b = make_inputs((2,), 6, 2, 3, torch.float32)
    y = lx.lowrank_linear(x.as_subclass(Logged), A, B, b)
    assert any("lowrank_linear" in str(f) for f in seen)
    torch.testing.assert_close(y.as_subclass(torch.Tensor), lx.lowrank_linear(x, A, B, b))


def test_parameters_take_the_fast_path_and_keep_autograd():
    A = torch.nn.Parameter(torch.randn(2, 6))
    B = torch.nn.Parameter(torch.randn(3, 2))
    y = lx.lowrank_linear(torch.randn(4, 6), A, B)
    assert y.requires_grad
    y.sum().backward()
    assert A.grad is not None and B.grad is not None
