"""Bad input raises ValueError, TypeError or RuntimeError naming the argument,
with the same text on both backends (this file runs under each of them, and
the compiled kernels are also compared with the pure-torch ones directly)."""

import itertools
import math
import re
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lowrank_ext as lx
from lowrank_ext import _backend, _fallback

ops = torch.ops.lowrank_ext


def good():
    return torch.randn(4, 6), torch.randn(2, 6), torch.randn(3, 2), torch.randn(3)


def _with(**changes):
    x, A, B, b = good()
    args = dict(x=x, A=A, B=B, bias=b)
    args.update(changes)
    return args


DT = "; all tensors must share one dtype"
LOWRANK_CASES = [
    (_with(x=torch.tensor(1.0)), ValueError,
     "lowrank_linear: x must have at least 1 dimension (..., k), got a 0-D tensor"),
    (_with(x=torch.ones(4, 6, dtype=torch.int64)), TypeError,
     "lowrank_linear: x must be float32, float64, float16 or bfloat16, got int64"),
    (_with(x=torch.ones(4, 6, dtype=torch.bool)), TypeError,
     "lowrank_linear: x must be float32, float64, float16 or bfloat16, got bool"),
    (_with(x=torch.ones(4, 6, dtype=torch.complex64)), TypeError,
     "lowrank_linear: x must be float32, float64, float16 or bfloat16, got complex64"),
    # dtypes named as Python names them on both backends (not UInt16).
    (_with(x=torch.ones(4, 6, dtype=torch.uint16)), TypeError,
     "lowrank_linear: x must be float32, float64, float16 or bfloat16, got uint16"),
    (_with(x=torch.ones(4, 6).to(torch.float8_e4m3fn)), TypeError,
     "lowrank_linear: x must be float32, float64, float16 or bfloat16, got float8_e4m3fn"),
    (_with(A=torch.tensor(1.0)), ValueError, "lowrank_linear: A must be 2-D (r, k), got shape []"),
    (_with(A=torch.randn(2, 6, dtype=torch.float64)), TypeError,
     "lowrank_linear: A has dtype float64 but x has dtype float32" + DT),
    (_with(B=torch.ones(3, 2, dtype=torch.int32)), TypeError,
     "lowrank_linear: B has dtype int32 but x has dtype float32" + DT),
    (_with(bias=torch.randn(3, dtype=torch.float16)), TypeError,
     "lowrank_linear: bias has dtype float16 but x has dtype float32" + DT),
    (_with(A=torch.randn(2, 6, device="meta")), RuntimeError,
     "lowrank_linear: A is on meta but x is on cpu; all tensors must be on one device"),
    (_with(A=torch.randn(6)), ValueError, "lowrank_linear: A must be 2-D (r, k), got shape [6]"),
    (_with(B=torch.randn(1, 3, 2)), ValueError,
     "lowrank_linear: B must be 2-D (d, r), got shape [1, 3, 2]"),
    (_with(A=torch.randn(2, 5)), ValueError,
     "lowrank_linear: A has shape [2, 5] but x has k=6 features in its last dimension "
     "(x shape [4, 6])"),
    (_with(B=torch.randn(3, 4)), ValueError,
     "lowrank_linear: B has shape [3, 4] but A has rank r=2 (A shape [2, 6]); B must be (d, r)"),
    (_with(bias=torch.randn(4)), ValueError,
     "lowrank_linear: bias must have shape [d] = [3], got shape [4]"),
    (_with(bias=torch.randn(1, 3)), ValueError,
     "lowrank_linear: bias must have shape [d] = [3], got shape [1, 3]"),
]
NON_TENSOR_CASES = [
    (_with(x=[[1.0] * 6] * 4), "lowrank_linear: x must be a Tensor, got list"),
    (_with(A=None), "lowrank_linear: A must be a Tensor, got NoneType"),
    (_with(bias="b"), "lowrank_linear: bias must be a Tensor, got str"),
]


def _ids(cases):
    return [re.sub(r"lowrank_linear: |lora_linear: |svd_truncate: ", "", c[-1])[:40] for c in cases]


def _raised_by_every_route(args, exc, message):
    """lowrank_linear's Python function, the op and the fallback all raise it."""
    for call in (lambda: lx.lowrank_linear(**args), lambda: ops.lowrank_linear(*args.values()),
                 lambda: _fallback.lowrank_linear(*args.values())):
        with pytest.raises(exc, match=re.escape(message) + "$"):
            call()


@pytest.mark.parametrize("args,exc,message", LOWRANK_CASES, ids=_ids(LOWRANK_CASES))
def test_lowrank_linear_bad_input(args, exc, message):
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)
                and v.device.type != "meta"}
    _raised_by_every_route(args, exc, message)
    for k, v in snapshot.items():
        assert torch.equal(args[k], v), f"{k} was modified"


@pytest.mark.parametrize("args,exc,message", LOWRANK_CASES, ids=_ids(LOWRANK_CASES))
def test_lowrank_linear_bad_input_with_autograd(args, exc, message):
    args = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
                and v.device.type != "meta" else v) for k, v in args.items()}
    with pytest.raises(exc, match=re.escape(message) + "$"):
        lx.lowrank_linear(**args)


@pytest.mark.parametrize("args,exc,message", LOWRANK_CASES[4:], ids=_ids(LOWRANK_CASES[4:]))
def test_fake_kernel_raises_the_same_error(args, exc, message):
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args.values()]
        with pytest.raises(exc, match=re.escape(message) + "$"):
            ops.lowrank_linear(*fake)


@pytest.mark.parametrize("args,message", NON_TENSOR_CASES, ids=_ids(NON_TENSOR_CASES))
def test_lowrank_linear_rejects_non_tensors(args, message):
    with pytest.raises(TypeError, match=re.escape(message) + "$"):
        lx.lowrank_linear(**args)


def lora_args(**changes):
    args = dict(x=torch.randn(4, 6), W=torch.randn(3, 6), A=torch.randn(2, 6), B=torch.randn(3, 2),
                bias=torch.randn(3), scale=0.5)
    args.update(changes)
    return args


LORA_CASES = [
    (lora_args(W=torch.randn(3, 5)), ValueError,
     "lora_linear: W has shape [3, 5] but x has k=6 features in its last dimension (x shape [4, 6])"),
    (lora_args(W=torch.randn(18)), ValueError, "lora_linear: W must be 2-D (d, k), got shape [18]"),
    (lora_args(B=torch.randn(5, 2)), ValueError,
     "lora_linear: B has shape [5, 2] but W has d=3 output features (W shape [3, 6])"),
    (lora_args(W=torch.randn(3, 6, dtype=torch.float64)), TypeError,
     "lora_linear: W has dtype float64 but x has dtype float32" + DT),
    (lora_args(scale=math.nan), ValueError, "lora_linear: scale must be finite, got nan"),
    (lora_args(scale=math.inf), ValueError, "lora_linear: scale must be finite, got inf"),
    (lora_args(scale="2"), TypeError, "lora_linear: scale must be a real number, got str"),
    (lora_args(scale=10**400), ValueError,
     "lora_linear: scale must be finite, got an int beyond float's range"),
    (lora_args(W=None), TypeError, "lora_linear: W must be a Tensor, got NoneType"),
    # Several problems at once: the tensors are named first on both backends.
    (lora_args(W=torch.randn(3, 6, dtype=torch.float64), scale=math.nan), TypeError,
     "lora_linear: W has dtype float64 but x has dtype float32" + DT),
    (lora_args(B=torch.randn(5, 2), scale=-math.inf), ValueError,
     "lora_linear: B has shape [5, 2] but W has d=3 output features (W shape [3, 6])"),
]


@pytest.mark.parametrize("args,exc,message", LORA_CASES, ids=_ids(LORA_CASES))
def test_lora_linear_bad_input(args, exc, message):
    with pytest.raises(exc, match=re.escape(message) + "$"):
        lx.lora_linear(**args)
    if exc is not TypeError or "dtype" in message:
        with pytest.raises(exc, match=re.escape(message) + "$"):
            _fallback.lora_linear(*args.values())


W6x4 = torch.randn(6, 4)
SVD_CASES = [
    (dict(W=W6x4, rank=0), ValueError, "svd_truncate: rank must be in [1, 4] for W of shape [6, 4], got 0"),
    (dict(W=W6x4, rank=5), ValueError, "svd_truncate: rank must be in [1, 4] for W of shape [6, 4], got 5"),
    (dict(W=W6x4, rank=2.5), TypeError, "svd_truncate: rank must be an int, got float"),
    (dict(W=W6x4, rank=True), TypeError, "svd_truncate: rank must be an int, got bool"),
    (dict(W=W6x4, rank=2, energy=0.9), ValueError,
     "svd_truncate: give exactly one of rank, energy or tol, got rank and energy"),
    (dict(W=W6x4), ValueError, "svd_truncate: give exactly one of rank, energy or tol, got none"),
    (dict(W=W6x4, energy=0.0), ValueError, "svd_truncate: energy must be in (0, 1], got 0.0"),
    (dict(W=W6x4, energy=1.5), ValueError, "svd_truncate: energy must be in (0, 1], got 1.5"),
    (dict(W=W6x4, energy=math.nan), ValueError, "svd_truncate: energy must be in (0, 1], got nan"),
    (dict(W=W6x4, tol=-0.1), ValueError, "svd_truncate: tol must be >= 0, got -0.1"),
    (dict(W=W6x4, tol=math.nan), ValueError, "svd_truncate: tol must be >= 0, got nan"),
    (dict(W=torch.randn(6), rank=1), ValueError, "svd_truncate: W must be 2-D (d, k), got shape [6]"),
    (dict(W=torch.randn(0, 4), rank=1), ValueError,
     "svd_truncate: W must not be empty, got shape [0, 4]"),
    (dict(W=torch.ones(3, 3, dtype=torch.int64), rank=1), TypeError,
     "svd_truncate: W must be float32, float64, float16 or bfloat16, got int64"),
    (dict(W=torch.tensor([[1.0, math.nan], [0.0, 1.0]]), rank=1), ValueError,
     "svd_truncate: W contains NaN or Inf"),
    (dict(W=torch.tensor([[1.0, math.inf], [0.0, 1.0]]), energy=0.5), ValueError,
     "svd_truncate: W contains NaN or Inf"),
    (dict(W=[[1.0]], rank=1), TypeError, "svd_truncate: W must be a Tensor, got list"),
    (dict(W=W6x4, rank=2, method="qr"), ValueError,
     "svd_truncate: method must be 'exact' or 'randomized', got 'qr'"),
    (dict(W=W6x4, energy=0.5, method="randomized"), ValueError,
     "svd_truncate: method='randomized' needs rank, not energy or tol"),
    (dict(W=W6x4, rank=7, method="randomized"), ValueError,
     "svd_truncate: rank must be in [1, 4] for W of shape [6, 4], got 7"),
    (dict(W=W6x4, rank=2**63), ValueError,
     f"svd_truncate: rank must be in [1, 4] for W of shape [6, 4], got {2**63}"),
]


@pytest.mark.parametrize("args,exc,message", SVD_CASES, ids=_ids(SVD_CASES))
def test_svd_truncate_bad_input(args, exc, message):
    W = args["W"]
    before = W.clone() if isinstance(W, torch.Tensor) else None
    with pytest.raises(exc, match=re.escape(message) + "$"):
        lx.svd_truncate(**args)
    if before is not None:
        assert torch.equal(W, before, ) or torch.isnan(before).any()


@pytest.mark.parametrize("args,exc,message",
                         [c for c in SVD_CASES if set(c[0]) == {"W", "rank"}
                          and isinstance(c[0]["W"], torch.Tensor) and type(c[0]["rank"]) is int
                          and c[0]["rank"] < 2**63],  # what the op's int64 schema takes
                         ids=str)
def test_svd_truncate_op_and_fallback_agree_on_errors(args, exc, message):
    with pytest.raises(exc, match=re.escape(message) + "$"):
        ops.svd_truncate(args["W"], args["rank"], False)
    with pytest.raises(exc, match=re.escape(message) + "$"):
        _fallback.svd_truncate(args["W"], args["rank"], False)


def test_choose_rank_bad_input():
    with pytest.raises(ValueError, match="choose_rank: give exactly one of energy or tol, got none"):
        lx.choose_rank(torch.ones(3))
    with pytest.raises(ValueError, match=r"choose_rank: S must be a non-empty 1-D tensor"):
        lx.choose_rank(torch.ones(2, 2), energy=0.5)
    with pytest.raises(ValueError, match="choose_rank: S must be finite and non-negative"):
        lx.choose_rank(torch.tensor([1.0, -1.0]), energy=0.5)
    with pytest.raises(TypeError, match="choose_rank: S must be a Tensor, got list"):
        lx.choose_rank([1.0], energy=0.5)
    with pytest.raises(ValueError, match="choose_rank: S must be in descending order"):
        lx.choose_rank(torch.tensor([1.0, 3.0, 2.0]), energy=0.5)


def test_backend_in_use_is_reported():
    info = lx.backend_info()
    assert info["compiled"] == _backend.compiled


def test_a_tol_past_floats_range_is_infinite_and_keeps_rank_one():
    B, A = lx.svd_truncate(W6x4, tol=10**400)
    assert A.shape == (1, 4) and B.shape == (6, 1)
    assert lx.choose_rank(torch.tensor([3.0, 2.0, 1.0]), tol=10**400) == 1


def test_numpy_scalars_are_real_numbers_for_scale():
    np = pytest.importorskip("numpy")
    args = lora_args()
    expected = lx.lora_linear(**{**args, "scale": 0.5})
    for scale in (np.float32(0.5), np.float64(0.5), np.int64(1) / 2):
        torch.testing.assert_close(lx.lora_linear(**{**args, "scale": scale}), expected)


# --- arguments the dispatcher passes through as they are -----------------------

LAYOUT_CASES = [
    (dict(bias=torch.randn(3).to_sparse()), TypeError,
     "lowrank_linear: bias must be a dense (strided) tensor, got layout sparse_coo"),
    (dict(A=torch.randn(2, 6).to_mkldnn()), TypeError,
     "lowrank_linear: A must be a strided or sparse COO, CSR or CSC tensor, got layout _mkldnn"),
]


@pytest.mark.parametrize("changes,exc,message", LAYOUT_CASES, ids=_ids(LAYOUT_CASES))
def test_layouts_the_op_cannot_take_are_named(changes, exc, message):
    _raised_by_every_route(_with(**changes), exc, message)
    lora = lora_args(W=torch.randn(3, 6).to_sparse())
    message = "lora_linear: W must be a dense (strided) tensor, got layout sparse_coo"
    with pytest.raises(TypeError, match=re.escape(message) + "$"):
        lx.lora_linear(**lora)
    with pytest.raises(TypeError, match=re.escape(message) + "$"):
        ops.lora_linear(*lora.values())


@pytest.mark.parametrize("sparse", ["x", "A", "B"])
def test_sparse_inputs_the_products_take_still_work(sparse):
    # A sparse B with a bias failed in both backends (F.linear has no kernel
    # for a sparse weight and a bias).
    x, A, B, b = good()
    expected = x.double() @ (B.double() @ A.double()).T + b.double()
    args = {"x": x, "A": A, "B": B}
    args[sparse] = args[sparse].to_sparse()
    for fn in (lx.lowrank_linear, _fallback.lowrank_linear):
        for bias in (b, None):
            want = expected if bias is not None else expected - b.double()
            torch.testing.assert_close(fn(*args.values(), bias).double(), want, rtol=1e-5,
                                       atol=1e-5)


SPARSE_LAYOUTS = {"coo": torch.Tensor.to_sparse, "csr": torch.Tensor.to_sparse_csr,
                  "csc": torch.Tensor.to_sparse_csc}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("sparse", ["x", "A", "B"])
@pytest.mark.parametrize("layout", sorted(SPARSE_LAYOUTS))
def test_a_sparse_operand_gets_the_other_gradients(layout, sparse, dtype):
    # The ops take a sparse x, A or B, but the backward reshaped x for gA (and
    # lora_linear's gW): "reshape is not implemented for sparse tensors"; a
    # half-type CSR/CSC operand then failed in torch's CPU product ("not
    # implemented for 'BFloat16'"), and a sparse A in lora's addmm.
    torch.manual_seed(0)
    dense = {"x": torch.randn(6, 8, dtype=torch.float64),
             "W": torch.randn(5, 8, dtype=torch.float64) / 3,
             "A": torch.randn(3, 8, dtype=torch.float64) / 3,
             "B": torch.randn(5, 3, dtype=torch.float64) / 2,
             "b": torch.randn(5, dtype=torch.float64)}
    dense[sparse][dense[sparse].abs() < 0.3] = 0
    dense = {name: t.to(dtype).double() for name, t in dense.items()}  # representable
    tol = {torch.float64: {}, torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(
        dtype, dict(rtol=2e-2, atol=2e-2))

    def run(call, use, trained):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's CSR/CSC "beta" notice
            args = {name: (SPARSE_LAYOUTS[layout](t.to(dtype)) if name == sparse and use == "ours"
                           else t.to(dtype if use == "ours" else torch.float64))
                    for name, t in dense.items()}
            leaves = [args[name].requires_grad_() for name in trained]
            y = call(args)
            return torch.autograd.grad(y.double().pow(2).sum(), leaves)

    calls = (
        lambda a: lx.lowrank_linear(a["x"], a["A"], a["B"], a["b"]),
        lambda a: lx.lora_linear(a["x"], a["W"], a["A"], a["B"], a["b"], 0.5))
    references = (
        lambda a: a["x"] @ a["A"].T @ a["B"].T + a["b"],
        lambda a: a["x"] @ a["W"].T + a["b"] + 0.5 * (a["x"] @ a["A"].T @ a["B"].T))
    operands = (("A", "B", "b"), ("W", "A", "B", "b"))
    for call, reference, used in zip(calls, references, operands):
        trained = [name for name in used if name != sparse]
        got = run(call, "ours", trained)
        expected = run(reference, "reference", trained)
        for name, g, e in zip(trained, got, expected):
            assert g.layout == torch.strided and g.dtype == dtype, name
            torch.testing.assert_close(g.double(), e, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layouts", [
    combo for combo in itertools.product(["strided", *SPARSE_LAYOUTS], repeat=3)
    if sum(layout != "strided" for layout in combo) >= 2], ids=",".join)
def test_several_sparse_operands_together(layouts):
    # With x and A sparse, t = x·Aᵀ came out sparse: with a bias, "add(sparse,
    # dense) is not supported", in the backward "reshape is not implemented
    # for sparse tensors"; mixed layouts (COO x, CSR A) had no kernel, and a
    # COO x with a COO A gave y = bias on the fallback (torch's sparse product
    # returns zeros below autograd with the ADInplaceOrView key on).
    torch.manual_seed(0)
    x, A, B, W, b = (torch.randn(6, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64),
                     torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64),
                     torch.randn(5, dtype=torch.float64))
    convert = {"strided": lambda t: t, **SPARSE_LAYOUTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's CSR/CSC "beta" notice
        xs, As, Bs = (convert[layout](t) for layout, t in zip(layouts, (x, A, B)))
        dense_B = layouts[2] == "strided"
        Bg = Bs.detach().requires_grad_() if dense_B else Bs
        bg, Wg = b.detach().requires_grad_(), W.detach().requires_grad_()
        y = lx.lowrank_linear(xs, As, Bg, bg)
        y_lora = lx.lora_linear(xs, Wg, As, Bg, bg, 0.5)
        gy = torch.randn(6, 5, dtype=torch.float64)
        got = torch.autograd.grad([y, y_lora], [bg, Wg] + ([Bg] if dense_B else []), [gy, gy])
    assert y.layout == y_lora.layout == torch.strided
    torch.testing.assert_close(y, x @ A.T @ B.T + b)
    torch.testing.assert_close(y_lora, x @ W.T + b + 0.5 * (x @ A.T @ B.T))
    # y + y_lora = x·Wᵀ + 2·bias + 1.5·(x·Aᵀ)·Bᵀ
    expected = [2 * gy.sum(0), gy.T @ x] + ([1.5 * gy.T @ (x @ A.T)] if dense_B else [])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("layout", sorted(SPARSE_LAYOUTS))
def test_a_sparse_x_must_be_a_matrix(layout):
    # A 3-D COO x passed the checks, then failed in torch's reshape.
    shapes = [[2, 4, 6]] + ([[6]] if layout == "coo" else [])  # CSR/CSC are at least 2-D
    for shape in shapes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sparse_x = SPARSE_LAYOUTS[layout](torch.randn(shape))
        args = dict(zip(("x", "A", "B", "bias"), good()), x=sparse_x)
        message = f"lowrank_linear: a sparse x must be 2-D (M, k), got shape {shape}"
        _raised_by_every_route(args, ValueError, message)


@pytest.mark.parametrize("name", ["x", "A", "B"])
def test_hybrid_sparse_operands_are_refused_by_name(name):
    # A 2-D COO tensor with one dense dimension (to_sparse(1)) passed the
    # checks and failed in torch's products ("matrices expected, got 1D").
    args = dict(zip(("x", "A", "B", "bias"), good()))
    args[name] = args[name].to_sparse(1)
    message = (f"lowrank_linear: {name} must be a sparse matrix of numbers, got a hybrid "
               "sparse tensor with 1 sparse and 1 dense dimension(s)")
    _raised_by_every_route(args, ValueError, message)


@pytest.mark.parametrize("layout", ["sparse_bsr", "sparse_bsc"])
@pytest.mark.parametrize("name", ["x", "A", "B"])
def test_block_sparse_operands_are_refused_by_name(name, layout):
    # torch's CPU products take the block layouts on one side only: a BSR x
    # ran forward and failed in its backward, a BSC x failed with addmm's
    # message. Both backends refuse them up front.
    args = dict(zip(("x", "A", "B", "bias"), good()))
    to_block = {"sparse_bsr": torch.Tensor.to_sparse_bsr,
                "sparse_bsc": torch.Tensor.to_sparse_bsc}[layout]
    args[name] = to_block(args[name], (1, 1))
    message = (f"lowrank_linear: {name} must be a strided or sparse COO, CSR or CSC tensor, "
               f"got layout {layout}; convert it with .to_sparse() (COO)")
    _raised_by_every_route(args, TypeError, message)


@pytest.mark.parametrize("name", ["x", "A", "B"])
def test_none_for_a_tensor_through_the_op_is_named(name):
    # torch.ops passes None through as an undefined tensor: the compiled
    # checks said "got unknown_scalar", the fallback raised AttributeError.
    args = _with(**{name: None})
    message = f"lowrank_linear: {name} must be a Tensor, got NoneType"
    for fn in (ops.lowrank_linear, _fallback.lowrank_linear, lx.lowrank_linear):
        with pytest.raises(TypeError, match=re.escape(message) + "$"):
            fn(*args.values())
    lora = lora_args(W=None)
    with pytest.raises(TypeError, match=re.escape("lora_linear: W must be a Tensor, got "
                                                  "NoneType") + "$"):
        ops.lora_linear(*lora.values())


def test_a_nan_scale_is_nan_whatever_its_sign():
    args = lora_args(scale=-math.nan)
    assert math.copysign(1.0, args["scale"]) == -1.0
    for fn in (lx.lora_linear, ops.lora_linear, _fallback.lora_linear):
        with pytest.raises(ValueError, match="lora_linear: scale must be finite, got nan$"):
            fn(*args.values())


def test_tangents_through_the_op_itself_are_refused_on_both_backends():
    import torch.autograd.forward_ad as fwAD

    x, A, B, b = good()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match=re.escape(
                "lowrank_linear: forward-mode AD (an argument with a tangent, such as a dual "
                "tensor) is not supported by torch.ops.lowrank_ext.lowrank_linear")):
            ops.lowrank_linear(dual, A, B, b)
        with pytest.raises(RuntimeError, match="lora_linear: forward-mode AD"):
            ops.lora_linear(dual, torch.randn(3, 6), A, B, b, 0.5)
        # The Python function carries the tangent.
        tangent = fwAD.unpack_dual(lx.lowrank_linear(dual, A, B, b)).tangent
    torch.testing.assert_close(tangent, torch.ones_like(x) @ (B @ A).T)


def test_nested_tensors_are_named():
    x, A, B, b = good()
    nested = torch.nested.nested_tensor([x[:2], x[:1]], layout=torch.jagged)
    with pytest.raises(TypeError, match="lowrank_linear: x is a nested tensor, which the op "
                                        "does not take"):
        lx.lowrank_linear(nested, A, B, b)
    with pytest.raises(TypeError, match="lora_linear: x is a nested tensor"):
        lx.lora_linear(nested, torch.randn(3, 6), A, B, b, 0.5)


def test_strided_nested_tensors_are_named():
    # A nested tensor of the default (strided) layout is no tensor subclass:
    # the compiled entry point passed it to the dispatcher, whose error
    # ("Could not run ... 'NestedTensorCPU' backend") named no argument.
    x, A, B, b = good()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the layout's prototype notice
        nested = torch.nested.nested_tensor([x[:2], x[:1]])
    with pytest.raises(TypeError, match="lowrank_linear: x is a nested tensor, which the op "
                                        "does not take"):
        lx.lowrank_linear(nested, A, B, b)
    with pytest.raises(TypeError, match="lora_linear: x is a nested tensor"):
        lx.lora_linear(nested, torch.randn(3, 6), A, B, b, 0.5)
