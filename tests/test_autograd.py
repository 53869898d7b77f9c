"""Gradients: gradcheck in float64, agreement with autograd through the dense
reference, and what backward keeps alive."""

import warnings

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


def _strided(t, layout):
    """t with the same values in another memory layout (last two dims)."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "every_other":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.clone()


# The last two have float16 operands and gradients of over 1024 elements,
# which ATen converts.
SMALL_SHAPES = [(1, 10, 2, 10), (5, 7, 3, 4), (2, 3, 1, 64), (0, 6, 2, 5), (4, 6, 0, 5),
                (3, 0, 2, 5), (16, 32, 4, 24), (1, 1500, 2, 10), (1, 10, 2, 1500)]


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "every_other"])
@pytest.mark.parametrize("needs", ["all", "x", "A", "B", "bias", "no_bias"])
def test_small_backward_matches_float64(dtype, shape, layout, needs):
    # Problems of at most a few thousand multiply-adds take the CPU backward's
    # one-pass loops (csrc/cpu/small_backward.cpp), which read every operand
    # through its strides and sum in float32 (float64 for float64); the
    # fallback differentiates the composition. The gradients of both match
    # float64, in every layout and for every subset of inputs.
    M, k, r, d = shape
    x, A, B, b = (torch.randn(M, 2, k).to(dtype), (torch.randn(r, k) / 3).to(dtype),
                  (torch.randn(d, r) / 2).to(dtype), torch.randn(d).to(dtype))
    gy = _strided(torch.randn(M, 2, d).to(dtype), layout)
    grad_of = {"all": (True,) * 4, "x": (True, False, False, False),
               "A": (False, True, False, False), "B": (False, False, True, False),
               "bias": (False, False, False, True), "no_bias": (True, True, True, False)}[needs]
    leaves = [x, A, B, None if needs == "no_bias" else b]
    mine = [None if t is None else _strided(t, layout).requires_grad_(wanted)
            for t, wanted in zip(leaves, grad_of)]
    ref = [None if t is None else t.double().requires_grad_(wanted)
           for t, wanted in zip(leaves, grad_of)]
    y = lx.lowrank_linear(*mine)
    with product_dtypes() as seen:
        y.backward(gy)
    yr = ref[0] @ (ref[2] @ ref[1]).T
    (yr if ref[3] is None else yr + ref[3]).backward(gy.double())
    if lx.backend_info()["compiled"]:  # .to() conversions are no products
        assert not seen, f"the small backward ran ATen products: {seen}"
    tol = TOLERANCES[dtype]
    for m, rf in zip(mine, ref):
        if rf is None or rf.grad is None:
            assert m is None or m.grad is None
            continue
        assert m.grad.dtype == dtype and m.grad.shape == m.shape
        scale = max([1.0] + rf.grad.abs().flatten().tolist())
        torch.testing.assert_close(m.grad.double(), rf.grad, rtol=tol["rtol"],
                                   atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_small_backward_keeps_float16_range_and_non_finite_values(dtype):
    # gt = gy·B is summed in float32: past 65504 in float16 it would be inf
    # where gx = gt·A is representable. Non-finite inputs give non-finite
    # gradients, as the products do.
    x = torch.ones(1, 4, dtype=dtype, requires_grad=True)
    A = torch.full((1, 4), 1e-3, dtype=dtype, requires_grad=True)
    B = torch.full((2, 1), 300.0, dtype=dtype, requires_grad=True)
    lx.lowrank_linear(x, A, B).backward(torch.full((1, 2), 200.0, dtype=dtype))
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), torch.full((1, 4), 120.0, dtype=torch.float64),
                               rtol=1e-2, atol=0)
    x.grad = None
    gy = torch.tensor([[float("inf"), 1.0]], dtype=dtype)
    lx.lowrank_linear(x, A, B).backward(gy)
    assert torch.isinf(x.grad).all() and torch.isinf(B.grad[0]).all()
    assert torch.isfinite(B.grad[1]).all()


def test_larger_backwards_keep_the_products():
    # Above the small bound (a few thousand multiply-adds) the products run
    # as before: the small loops are single-threaded and unblocked.
    if not lx.backend_info()["compiled"]:
        pytest.skip("the fallback differentiates the composition")
    x, A, B = _leaf(64, 128, dtype=torch.float32), _leaf(16, 128, dtype=torch.float32), \
        _leaf(96, 16, dtype=torch.float32)
    y = lx.lowrank_linear(x, A, B)
    with product_dtypes() as seen:
        y.sum().backward()
    assert seen


@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
@pytest.mark.parametrize("shape", [(3, 5, 2, 4), (4, 300, 16, 300)], ids=str)
def test_a_traced_gradient_computation_replays_on_new_inputs(op, shape):
    # torch.jit.trace records ATen ops only: a backward it records runs them
    # on a t recomputed from x and A (the saved t, computed below the tracer,
    # would be a constant of the trace, and the small backward's loops would
    # be traced as empty outputs), on both backends.
    M, k, r, d = shape

    def forward(x, W, A, B, b):
        return lx.lowrank_linear(x, A, B, b) if op == "lowrank_linear" \
            else lx.lora_linear(x, W, A, B, b, scale=0.7)

    def grads(*args):
        return torch.autograd.grad(forward(*args).pow(2).sum(), args, materialize_grads=True)

    def inputs():
        return (torch.randn(M, k).requires_grad_(), (torch.randn(d, k) / 8).requires_grad_(),
                (torch.randn(r, k) / 4).requires_grad_(), (torch.randn(d, r) / 4).requires_grad_(),
                torch.randn(d).requires_grad_())

    with warnings.catch_warnings():  # the tracer's deprecation and its TracerWarnings
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(grads, inputs(), check_trace=False)
    fresh = inputs()
    x, W, A, B, b = ref = [t.detach().double().requires_grad_() for t in fresh]
    y = x @ (B @ A).T + b if op == "lowrank_linear" else x @ (W + 0.7 * B @ A).T + b
    want = torch.autograd.grad(y.pow(2).sum(), ref, allow_unused=True)
    for got, wanted in zip(traced(*fresh), want):
        wanted = torch.zeros_like(got, dtype=torch.float64) if wanted is None else wanted
        scale = max([1.0] + wanted.abs().flatten().tolist())
        torch.testing.assert_close(got.double(), wanted, rtol=1e-4, atol=1e-4 * scale)


def test_no_rank_or_no_rows_keep_the_products():
    # With r = 0 (or M = 0) there are no multiply-adds, but the small loops
    # would still widen gy and x and round the gradients on one thread: the
    # operands' size bounds them too.
    if not lx.backend_info()["compiled"]:
        pytest.skip("the fallback differentiates the composition")
    x, A, B, b = (_leaf(256, 256, dtype=torch.float32), _leaf(0, 256, dtype=torch.float32),
                  _leaf(256, 0, dtype=torch.float32), _leaf(256, dtype=torch.float32))
    y, gy = lx.lowrank_linear(x, A, B, b), torch.randn(256, 256)
    with product_dtypes() as seen:
        y.backward(gy)
    assert seen
    torch.testing.assert_close(x.grad, torch.zeros(256, 256))
    torch.testing.assert_close(b.grad, gy.sum(0))


def _composition(op, x, W, A, B, b):
    return x @ (B @ A).T + b if op == "lowrank_linear" else x @ (W + 0.7 * B @ A).T + b


@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
@pytest.mark.parametrize("wanted,changed", [("B", "x"), ("x", "x"), ("B", "B"), ("A", "A"),
                                            ("x", "bias")])
def test_operands_no_wanted_gradient_reads_may_change_after_the_forward(op, wanted, changed):
    # As torch's composition keeps only what its gradients read, an operand
    # changed in place between forward and backward (a residual x += layer(x),
    # a frozen factor updated) fails only a backward that reads it. The
    # gradients are those of the values at the forward.
    M, k, r, d = 6, 12, 3, 8
    leaves = dict(x=torch.randn(M, k), W=torch.randn(d, k) / 4, A=torch.randn(r, k) / 4,
                  B=torch.randn(d, r) / 2, bias=torch.randn(d))
    mine = {n: t.clone().requires_grad_(n == wanted) for n, t in leaves.items()}
    ref = {n: t.double().requires_grad_(n == wanted) for n, t in leaves.items()}
    args = [mine[n] for n in ("x", "W", "A", "B", "bias")]
    y = lx.lowrank_linear(*args[:1], *args[2:]) if op == "lowrank_linear" \
        else lx.lora_linear(*args, scale=0.7)
    gy = torch.randn(M, d)
    with torch.no_grad():
        mine[changed].add_(1.0)
    y.backward(gy)
    _composition(op, *ref.values()).backward(gy.double())
    torch.testing.assert_close(mine[wanted].grad.double(), ref[wanted].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
def test_an_operand_a_wanted_gradient_reads_still_may_not_change(op):
    # gA reads x: changing x after the forward is torch's version error, as
    # in the composition.
    x, W, A, B = torch.randn(4, 6), torch.randn(5, 6), torch.randn(2, 6).requires_grad_(), \
        torch.randn(5, 2)
    y = lx.lowrank_linear(x, A, B) if op == "lowrank_linear" else lx.lora_linear(x, W, A, B)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_only_operands_a_wanted_gradient_reads_stay_in_memory():
    # Input gradients through a frozen layer keep A and B (gx = (gy·B)·A):
    # the activation x is freed once nothing else holds it.
    from torch.multiprocessing.reductions import StorageWeakRef

    base = torch.randn(16, 40, requires_grad=True)
    A, B = torch.randn(3, 40), torch.randn(50, 3)
    x = base * 2  # an activation; its own backward keeps no copy of it
    x_storage = StorageWeakRef(x.untyped_storage())
    y = lx.lowrank_linear(x, A, B)
    del x
    assert x_storage.expired()
    y.sum().backward()
    torch.testing.assert_close(base.grad, 2 * torch.ones(16, 50) @ B @ A)


@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
def test_saved_tensor_hooks_see_the_operands_themselves(op):
    # Under saved-tensor hooks every operand is saved as before: save_on_cpu
    # copies what it packs, and a stand-in without data cannot be copied.
    x, W, A, B = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6), torch.randn(2, 6), \
        torch.randn(5, 2)
    with torch.autograd.graph.save_on_cpu():
        y = lx.lowrank_linear(x, A, B) if op == "lowrank_linear" else lx.lora_linear(x, W, A, B)
    y.sum().backward()
    dense = B @ A if op == "lowrank_linear" else W + B @ A
    torch.testing.assert_close(x.grad, torch.ones(4, 5) @ dense)
