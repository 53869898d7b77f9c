"""torch.vmap over the fused ops: batching rules, against float64 references and loops."""

import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx
from conftest import DTYPES, TOLERANCES

ops = torch.ops.lowrank_ext
N = 3  # vmap batch size


def _make(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _reference(x, A, B, bias, W=None, scale=1.0):
    """float64 per-sample y for one sample's arguments."""
    x, A, B = x.double(), A.double(), B.double()
    y = x @ (B @ A).T
    if W is not None:
        y = x @ W.double().T + scale * y
    return y if bias is None else y + bias.double()


def _assert_close(got, expected, dtype):
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got.double() / scale, expected / scale, **TOLERANCES[dtype])


@pytest.fixture(autouse=True)
def _no_fallback_warning():
    """vmap warns when an op has no batching rule and it loops instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_dim, out_dim", [(0, 0), (1, 0), (2, 1), (0, -1)])
def test_shared_weights_batch_the_input(in_dim, out_dim, dtype):
    x = _make(4, 5, 12, dtype=dtype).movedim(0, in_dim)  # batch of 4 at in_dim
    A, B, bias = _make(3, 12, dtype=dtype), _make(7, 3, dtype=dtype), _make(7, dtype=dtype)
    y = torch.vmap(lambda xs: lx.lowrank_linear(xs, A, B, bias), in_dims=in_dim,
                   out_dims=out_dim)(x)
    assert y.dtype == dtype
    y = y.movedim(out_dim, 0)
    xb = x.movedim(in_dim, 0)
    for i in range(4):
        _assert_close(y[i], _reference(xb[i], A, B, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", ["A", "B", "bias", "x A B bias", "A B"])
def test_per_sample_weights(batched, dtype):
    names = batched.split()
    shapes = {"x": (6, 10), "A": (4, 10), "B": (9, 4), "bias": (9,)}
    args = {n: _make(*((N,) * (n in names) + s), dtype=dtype) for n, s in shapes.items()}
    order = ("x", "A", "B", "bias")
    in_dims = tuple(0 if n in names else None for n in order)
    y = torch.vmap(lx.lowrank_linear, in_dims=in_dims)(*(args[n] for n in order))
    assert y.shape == (N, 6, 9) and y.dtype == dtype
    for i in range(N):
        sample = [args[n][i] if n in names else args[n] for n in order]
        _assert_close(y[i], _reference(*sample), dtype)


@pytest.mark.parametrize("batched", [("x",), ("A", "B"), ("x", "W", "bias")])
def test_lora_linear(batched):
    shapes = {"x": (2, 5, 10), "W": (8, 10), "A": (3, 10), "B": (8, 3), "bias": (8,)}
    args = {n: _make(*((N,) * (n in batched) + s)) for n, s in shapes.items()}
    order = ("x", "W", "A", "B", "bias")
    in_dims = tuple(0 if n in batched else None for n in order) + (None,)
    y = torch.vmap(lx.lora_linear, in_dims=in_dims)(*(args[n] for n in order), 0.25)
    for i in range(N):
        sample = [args[n][i] if n in batched else args[n] for n in order]
        x, W, A, B, bias = sample
        _assert_close(y[i], _reference(x, A, B, bias, W=W, scale=0.25), torch.float64)


@pytest.mark.parametrize("weights_batched", [False, True])
def test_with_intermediate_ops(weights_batched):
    x = _make(N, 4, 10)
    A = _make(N, 3, 10) if weights_batched else _make(3, 10)
    B, bias = _make(6, 3), _make(6)
    in_dims = (0, 0 if weights_batched else None, None, None)
    y, t = torch.vmap(ops.lowrank_linear_with_intermediate.default, in_dims=in_dims)(x, A, B,
                                                                                  bias)
    W = _make(6, 10)
    y2, t2 = torch.vmap(ops.lora_linear_with_intermediate.default,
                        in_dims=(0, None, *in_dims[1:], None))(x, W, A, B, bias, 2.0)
    for i in range(N):
        Ai = A[i] if weights_batched else A
        torch.testing.assert_close(t[i], x[i] @ Ai.T)
        torch.testing.assert_close(t2[i], x[i] @ Ai.T)
        _assert_close(y[i], _reference(x[i], Ai, B, bias), torch.float64)
        _assert_close(y2[i], _reference(x[i], Ai, B, bias, W=W, scale=2.0), torch.float64)


@pytest.mark.parametrize("weights_batched", [False, True])
def test_gradients_through_vmap(weights_batched):
    x = _make(N, 4, 10).requires_grad_()
    A = (_make(N, 3, 10) if weights_batched else _make(3, 10)).requires_grad_()
    B, bias = _make(6, 3).requires_grad_(), _make(6).requires_grad_()
    in_dims = (0, 0 if weights_batched else None, None, None)
    y = torch.vmap(lx.lowrank_linear, in_dims=in_dims)(x, A, B, bias)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B, bias), gy)
    # The same loss through a plain Python loop of the composition.
    loop = torch.stack([
        (x[i] @ (A[i] if weights_batched else A).T) @ B.T + bias for i in range(N)])
    expected = torch.autograd.grad(loop, (x, A, B, bias), gy)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_model_ensemble_with_functional_call():
    members = [nn.Sequential(lx.LowRankLinear(10, 16, 4, dtype=torch.float64), nn.ReLU(),
                             lx.LoRALinear(nn.Linear(16, 5, dtype=torch.float64), 2))
               for _ in range(N)]
    for m in members:
        with torch.no_grad():
            m[2].B.normal_()
    params, buffers = torch.func.stack_module_state(members)
    skeleton = members[0]

    def run(p, b, x):
        return torch.func.functional_call(skeleton, (p, b), (x,))

    x = _make(7, 10)
    y = torch.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(members):
        torch.testing.assert_close(y[i], m(x))


def test_bad_input_is_reported_as_outside_vmap():
    x, B, bias = _make(4, 10), _make(6, 3), _make(6)
    with pytest.raises(ValueError, match="lowrank_linear: B has shape \\[6, 3\\] but A has "
                                         "rank r=5"):
        torch.vmap(lambda a: lx.lowrank_linear(x, a, B, bias))(_make(N, 5, 10))
    with pytest.raises(TypeError, match="lowrank_linear: A has dtype float32 but x has dtype "
                                        "float64"):
        torch.vmap(lambda a: lx.lowrank_linear(x, a, B, bias))(_make(N, 3, 10).float())
    A3 = _make(3, 10, 1)
    with pytest.raises(ValueError, match="lowrank_linear: A must be 2-D"):
        torch.vmap(lambda xs: lx.lowrank_linear(xs, A3, B, bias))(_make(N, 4, 10))


@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
def test_a_zero_dimensional_sample_is_refused_as_in_eager(op):
    # vmap over a 1-D x: each sample is 0-D, which the op refuses; the shared
    # weight rule must not read the batch as one row of k features.
    k = 4
    A, B, b, W = _make(2, k), _make(3, 2), _make(3), _make(3, k)
    call = ((lambda xi: lx.lowrank_linear(xi, A, B, b)) if op == "lowrank_linear" else
            (lambda xi: lx.lora_linear(xi, W, A, B, b, 0.5)))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        torch.vmap(call)(_make(k))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        torch.vmap(call)(_make(0))  # no samples at all


@pytest.mark.parametrize("case", ["no rows", "no samples"])
def test_per_sample_weights_with_nothing_to_compute(case):
    k, r, d = 5, 2, 4
    n = 0 if case == "no samples" else N
    x = _make(0 if case == "no rows" else 3, k)
    As, B, bias = _make(n, r, k), _make(d, r), _make(d)
    y = torch.vmap(lambda A: lx.lowrank_linear(x, A, B, bias))(As)
    assert y.shape == (n, x.shape[0], d)
    expected = torch.stack([_reference(x, A, B, bias) for A in As]) if n else y.double()
    torch.testing.assert_close(y.double(), expected)
    W = _make(d, k)
    y, t = torch.vmap(lambda A: ops.lora_linear_with_intermediate(x, W, A, B, None, 0.5))(As)
    assert y.shape == (n, x.shape[0], d) and t.shape == (n, x.shape[0], r)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("call", ["lx", "torch.ops"])
@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
def test_per_sample_weights_under_autocast_follow_the_cast_policy(op, call, x_dtype):
    # The rule runs before the ops' autocast kernels: float32 arguments must
    # still give the autocast dtype, and a bfloat16 x (after an autocast
    # nn.Linear) must be accepted next to float32 weights, as in eager.
    x = _make(5, 12, dtype=x_dtype)
    As, Bs = _make(N, 3, 12, dtype=torch.float32), _make(N, 7, 3, dtype=torch.float32)
    W, bias = _make(7, 12, dtype=torch.float32), _make(7, dtype=torch.float32)
    if op == "lowrank_linear":
        fn = lx.lowrank_linear if call == "lx" else ops.lowrank_linear.default
        run = lambda A, B: fn(x, A, B, bias)  # noqa: E731
    else:
        fn = lx.lora_linear if call == "lx" else ops.lora_linear.default
        run = lambda A, B: fn(x, W, A, B, bias, 0.5)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.vmap(run)(As, Bs)
        eager = [run(As[i], Bs[i]) for i in range(N)]
    assert y.dtype == torch.bfloat16 and all(e.dtype == torch.bfloat16 for e in eager)
    cast = lambda t: t.bfloat16().double()  # noqa: E731  (as autocast casts them)
    for i in range(N):
        W_i = None if op == "lowrank_linear" else cast(W)
        _assert_close(y[i], _reference(cast(x), cast(As[i]), cast(Bs[i]), cast(bias), W=W_i,
                                       scale=0.5), torch.bfloat16)


def test_per_sample_weights_under_autocast_keep_float64():
    # float64 is never cast: float64 weights with a float32 x still fail the
    # dtype check, as in eager and for F.linear.
    x = _make(5, 12).float()
    As, B = _make(N, 3, 12), _make(7, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.vmap(lambda A: ops.lowrank_linear(x.double(), A, B, None))(As)
        assert y.dtype == torch.float64
        with pytest.raises(TypeError, match="lowrank_linear: A has dtype float64 but x has "
                                            "dtype bfloat16"):
            torch.vmap(lambda A: ops.lowrank_linear(x, A, B, None))(As)


def test_a_shape_error_with_shared_weights_names_the_sample_shape():
    # The shared-weights route handed the whole batch to the op, whose error
    # named the batch's shape ([7, 3, 6]) instead of the sample's.
    A, B, bias, W = _make(2, 5), _make(4, 2), _make(4), _make(4, 5)
    xs = _make(7, 3, 6)  # k=6 where A wants 5
    with pytest.raises(ValueError, match="x has k=6 features in its last dimension "
                                         "\\(x shape \\[3, 6\\]\\)$"):
        torch.vmap(lambda x: lx.lowrank_linear(x, A, B, bias))(xs)
    with pytest.raises(ValueError, match="lora_linear: W has shape \\[4, 5\\] but x has k=6 "
                                         "features .* \\(x shape \\[3, 6\\]\\)$"):
        torch.vmap(lambda x: lx.lora_linear(x, W, A, B, bias, 0.5))(xs)


@pytest.mark.parametrize("sparse, batched", [("B", "A"), ("A", "bias"), ("x", "bias"),
                                             ("x", "A B")])
def test_unbatched_sparse_arguments_with_per_sample_ones(sparse, batched):
    # The ops take a sparse x, A or B; with another argument batched, the
    # rule expanded the sparse one ("expand is unsupported for Sparse tensors").
    names = batched.split()
    shapes = {"x": (6, 10), "A": (4, 10), "B": (9, 4), "bias": (9,)}
    args = {n: _make(*((N,) * (n in names) + s), dtype=torch.float32) for n, s in shapes.items()}
    order = ("x", "A", "B", "bias")
    call = dict(args, **{sparse: args[sparse].to_sparse()})
    in_dims = tuple(0 if n in names else None for n in order)
    y = torch.vmap(lx.lowrank_linear, in_dims=in_dims)(*(call[n] for n in order))
    assert y.shape == (N, 6, 9) and y.layout == torch.strided
    for i in range(N):
        sample = [args[n][i] if n in names else args[n] for n in order]
        _assert_close(y[i], _reference(*sample), torch.float32)
        # As the eager op gives for the same sample.
        eager = lx.lowrank_linear(*(call[n][i] if n in names else call[n] for n in order))
        torch.testing.assert_close(y[i], eager)
    shapes_lora = {"x": (6, 10), "W": (9, 10), "A": (4, 10), "B": (9, 4), "bias": (9,)}
    lora = {n: _make(*((N,) * (n in names) + s)) for n, s in shapes_lora.items()}
    lora_call = dict(lora, **{sparse: lora[sparse].to_sparse()})
    lora_order = ("x", "W", "A", "B", "bias")
    y = torch.vmap(lx.lora_linear, in_dims=tuple(0 if n in names else None
                                                   for n in lora_order) + (None,))(
        *(lora_call[n] for n in lora_order), 0.5)
    for i in range(N):
        x, W, A, B, bias = (lora[n][i] if n in names else lora[n] for n in lora_order)
        _assert_close(y[i], _reference(x, A, B, bias, W=W, scale=0.5), torch.float64)


def test_bad_sparse_arguments_are_reported_as_outside_vmap():
    x, A, B, bias, W = _make(3, 5), _make(2, 5), _make(4, 2), _make(4), _make(4, 5)
    As = A.expand(N, 2, 5)
    bad_B = _make(4, 3).to_sparse()
    with pytest.raises(ValueError, match="lowrank_linear: B has shape \\[4, 3\\] but A has "
                                         "rank r=2"):
        torch.vmap(lambda a: lx.lowrank_linear(x, a, bad_B, bias))(As)
    with pytest.raises(TypeError, match="lowrank_linear: bias must be a dense \\(strided\\) "
                                        "tensor, got layout sparse_coo"):
        torch.vmap(lambda a: lx.lowrank_linear(x, a, B, bias.to_sparse()))(As)
    with pytest.raises(TypeError, match="lora_linear: W must be a dense \\(strided\\) tensor, "
                                        "got layout sparse_coo"):
        torch.vmap(lambda a: lx.lora_linear(x, W.to_sparse(), a, B, bias, 0.5))(As)
