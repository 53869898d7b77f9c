"""torch.func transforms, and forward-mode AD through dual tensors, over the fused ops
and modules, against the plain composition."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vjp, vmap

import lowrank_ext as lx

def _make(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _composition(x, A, B, bias):
    y = (x @ A.T) @ B.T
    return y if bias is None else y + bias


def _lora_composition(x, W, A, B, bias, scale):
    y = x @ W.T + scale * ((x @ A.T) @ B.T)
    return y if bias is None else y + bias


@pytest.fixture
def args():
    return _make(2, 3, 10), _make(4, 10), _make(7, 4), _make(7)


@pytest.fixture
def lora_args():
    return _make(2, 3, 10), _make(7, 10), _make(4, 10), _make(7, 4), _make(7)


def _loss(fn):
    return lambda *a: fn(*a).pow(2).sum()


@pytest.mark.parametrize("argnum", range(4))
def test_grad_every_argument(args, argnum):
    got = grad(_loss(lx.lowrank_linear), argnums=argnum)(*args)
    torch.testing.assert_close(got, grad(_loss(_composition), argnums=argnum)(*args))


@pytest.mark.parametrize("argnum", range(5))
def test_lora_grad_every_argument(lora_args, argnum):
    ours = lambda *a: lx.lora_linear(*a, 0.5)  # noqa: E731
    ref = lambda *a: _lora_composition(*a, 0.5)  # noqa: E731
    got = grad(_loss(ours), argnums=argnum)(*lora_args)
    torch.testing.assert_close(got, grad(_loss(ref), argnums=argnum)(*lora_args))


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobians(args, transform):
    argnums = (0, 1, 2, 3)
    got = transform(lx.lowrank_linear, argnums=argnums)(*args)
    expected = transform(_composition, argnums=argnums)(*args)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_lora_jacobians(lora_args):
    for transform in (jacrev, jacfwd):
        got = transform(lambda *a: lx.lora_linear(*a, 2.0), argnums=(0, 1, 2, 3, 4))(*lora_args)
        expected = transform(lambda *a: _lora_composition(*a, 2.0),
                             argnums=(0, 1, 2, 3, 4))(*lora_args)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def test_hessian(args):
    x, A, B, bias = args
    got = hessian(lambda a: lx.lowrank_linear(x, a, B, bias).pow(2).sum())(A)
    expected = hessian(lambda a: _composition(x, a, B, bias).pow(2).sum())(A)
    torch.testing.assert_close(got, expected)


def test_reverse_over_forward_second_derivatives(args, lora_args):
    # jacrev of jacfwd differentiates the tangent t·dBᵀ in reverse mode, so
    # the gradient reaches the intermediate t as well as the output: the
    # mixed blocks d²/dB dx and d²/dB dA depend on it.
    def loss(fn):
        return lambda *a: fn(*a).pow(2).sum()

    second = lambda f: jacrev(jacfwd(f, argnums=(0, 1, 2)), argnums=(0, 1, 2))  # noqa: E731
    got = second(loss(lx.lowrank_linear))(*args)
    expected = hessian(loss(_composition), argnums=(0, 1, 2))(*args)
    for row_got, row_expected in zip(got, expected):
        for g, e in zip(row_got, row_expected):
            torch.testing.assert_close(g, e)
    ours = lambda x, W, A, B, bias: lx.lora_linear(x, W, A, B, bias, 0.5)  # noqa: E731
    ref = lambda x, W, A, B, bias: _lora_composition(x, W, A, B, bias, 0.5)  # noqa: E731
    second = lambda f: jacrev(jacfwd(f, argnums=(0, 2, 3)), argnums=(0, 2, 3))  # noqa: E731
    got = second(loss(ours))(*lora_args)
    expected = hessian(loss(ref), argnums=(0, 2, 3))(*lora_args)
    for row_got, row_expected in zip(got, expected):
        for g, e in zip(row_got, row_expected):
            torch.testing.assert_close(g, e)


def test_forward_over_forward_second_derivatives(args, lora_args):
    # torch drops the outer tangent of an autograd.Function's jvp under a
    # second forward-mode transform: every mixed block of jacfwd(jacfwd(f))
    # and the jvp of a jvp came out 0.
    def loss(fn):
        return lambda *a: fn(*a).pow(2).sum()

    ours = lambda x, W, A, B, bias: lx.lora_linear(x, W, A, B, bias, 0.5)  # noqa: E731
    ref = lambda x, W, A, B, bias: _lora_composition(x, W, A, B, bias, 0.5)  # noqa: E731
    for fn, reference, inputs in ((lx.lowrank_linear, _composition, args),
                                  (ours, ref, lora_args)):
        argnums = tuple(range(len(inputs)))
        got = jacfwd(jacfwd(loss(fn), argnums=argnums), argnums=argnums)(*inputs)
        expected = hessian(loss(reference), argnums=argnums)(*inputs)
        for row_got, row_expected in zip(got, expected):
            for g, e in zip(row_got, row_expected):
                torch.testing.assert_close(g, e)
    x, A, B, bias = args
    dx, dA = torch.randn_like(x), torch.randn_like(A)

    def jvp_of_jvp(fn):
        inner = lambda a: torch.func.jvp(lambda x_: fn(x_, a, B, bias), (x,), (dx,))[1]  # noqa: E731
        return torch.func.jvp(inner, (A,), (dA,))[1]

    torch.testing.assert_close(jvp_of_jvp(lx.lowrank_linear), jvp_of_jvp(_composition))
    torch.testing.assert_close(jvp_of_jvp(_composition), (dx @ dA.T) @ B.T)


def test_reverse_mode_through_a_forward_mode_tangent(args):
    # A tangent from dual tensors, differentiated by plain autograd: the
    # tangent of B alone reaches x only through the intermediate.
    x, A, B, bias = args
    x = x.clone().requires_grad_()
    dB = torch.randn_like(B)

    def grad_of_tangent(fn):
        with fwAD.dual_level():
            y = fn(x, A, fwAD.make_dual(B, dB), bias)
            tangent = fwAD.unpack_dual(y).tangent
        return torch.autograd.grad(tangent.pow(2).sum(), x)[0]

    torch.testing.assert_close(grad_of_tangent(lx.lowrank_linear),
                               grad_of_tangent(_composition))


def test_jvp_of_a_vmap_over_the_ops(args, lora_args):
    # vmap's generated rule asks the Function's jvp for a tangent of every
    # output, the non-differentiable intermediate included.
    x, A, B, bias = args
    dA = torch.randn_like(A)
    per_row = lambda a: vmap(lambda xi: lx.lowrank_linear(xi, a, B, bias))(x)  # noqa: E731
    _, got = torch.func.jvp(per_row, (A,), (dA,))
    torch.testing.assert_close(got, (x @ dA.T) @ B.T)
    x, W, A, B, bias = lora_args
    per_row = lambda a: vmap(lambda xi: lx.lora_linear(xi, W, a, B, bias, 0.5))(x)  # noqa: E731
    _, got = torch.func.jvp(per_row, (A,), (dA,))
    torch.testing.assert_close(got, 0.5 * ((x @ dA.T) @ B.T))


def test_vjp(args):
    y, pullback = vjp(lx.lowrank_linear, *args)
    y_ref, pullback_ref = vjp(_composition, *args)
    torch.testing.assert_close(y, y_ref)
    cotangent = torch.randn_like(y)
    for g, e in zip(pullback(cotangent), pullback_ref(cotangent)):
        torch.testing.assert_close(g, e)


def test_per_sample_gradients_of_a_module():
    model = nn.Sequential(lx.LowRankLinear(10, 16, 4, dtype=torch.float64), nn.Tanh(),
                          lx.LoRALinear(nn.Linear(16, 3, dtype=torch.float64), 2))
    with torch.no_grad():
        model[2].B.normal_()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x, target = _make(5, 10), _make(5, 3)

    def sample_loss(p, xi, ti):
        return (functional_call(model, p, (xi.unsqueeze(0),)) - ti).pow(2).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
    assert set(per_sample) == {"0.A", "0.B", "0.bias", "2.A", "2.B"}
    for i in range(5):
        model.zero_grad()
        sample_loss(dict(model.named_parameters()), x[i], target[i]).backward()
        for name, g in per_sample.items():
            torch.testing.assert_close(g[i], model.get_parameter(name).grad)


def test_float32_and_half_inputs(args):
    for dtype in (torch.float32, torch.bfloat16):
        x, A, B, bias = (t.to(dtype) for t in args)
        got = grad(lambda a: lx.lowrank_linear(x, a, B, bias).float().pow(2).sum())(A)
        A_ref = A.detach().clone().requires_grad_()
        lx.lowrank_linear(x, A_ref, B, bias).float().pow(2).sum().backward()
        assert got.dtype == dtype
        torch.testing.assert_close(got, A_ref.grad)


def test_bad_input_under_a_transform_raises_as_outside(args):
    x, A, B, bias = args
    with pytest.raises(ValueError, match="lowrank_linear: B has shape \\[7, 4\\] but A has "
                                         "rank r=5"):
        grad(lambda a: lx.lowrank_linear(x, a, B, bias).sum())(_make(5, 10))
    with pytest.raises(TypeError, match="lowrank_linear: B must be a Tensor, got list"):
        grad(lambda a: lx.lowrank_linear(x, a, [1.0], bias).sum())(A)
    with pytest.raises(ValueError, match="lora_linear: scale must be finite"):
        grad(lambda a: lx.lora_linear(x, _make(7, 10), a, B, bias, float("inf")).sum())(A)


@pytest.mark.parametrize("make", [lambda: lx.LowRankLinear(10, 7, 3, dtype=torch.float64),
                                  lambda: lx.LoRALinear(nn.Linear(10, 7, dtype=torch.float64), 2)],
                         ids=["LowRankLinear", "LoRALinear"])
def test_compiled_transforms_give_the_eager_gradients(make):
    # torch.compile of torch.func.grad (and vmap of it) over the modules:
    # the ops take their eager route, recorded as one call of the graph; the
    # result is the eager one.
    torch.manual_seed(0)
    module = make()
    if isinstance(module, lx.LoRALinear):
        with torch.no_grad():
            module.B.normal_()
    params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
    x = _make(5, 10)

    def loss(p, x):
        return functional_call(module, p, (x,)).square().sum()

    expected = grad(loss)(params, x)
    torch._dynamo.reset()
    try:
        got = torch.compile(grad(loss), backend="aot_eager")(params, x)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name])
        per_sample = torch.compile(vmap(grad(loss), in_dims=(None, 0)),
                                   backend="aot_eager")(params, x.unsqueeze(1))
        for name in expected:
            torch.testing.assert_close(per_sample[name].sum(0), expected[name])
    finally:
        # Later fullgraph compiles of the modules must start afresh.
        torch._dynamo.reset()


# --- forward-mode AD through dual tensors (torch.autograd.forward_ad) ----------
# The ops' autograd kernels have no forward formula: the C++ one dropped a
# tangent, the fallback's refused it; lowrank_ext's functions carry it.

DUAL_ARGUMENTS = {"lowrank_linear": ("x", "A", "B", "bias"),
                  "lora_linear": ("x", "W", "A", "B", "bias")}
LORA_SCALE = 0.5


def _analytic_tangent(op, primals, tangents):
    """dy by the product rule, term by term, in float64 (a zero for each
    argument without a tangent)."""
    p = dict(zip(DUAL_ARGUMENTS[op], primals))
    d = {n: tangents.get(n, torch.zeros_like(p[n])) for n in p}
    adapter = (d["x"] @ p["A"].T @ p["B"].T + p["x"] @ d["A"].T @ p["B"].T
               + p["x"] @ p["A"].T @ d["B"].T)
    if op == "lowrank_linear":
        return adapter + d["bias"]
    return d["x"] @ p["W"].T + p["x"] @ d["W"].T + d["bias"] + LORA_SCALE * adapter


def _call(op, *tensors):
    return (lx.lowrank_linear(*tensors) if op == "lowrank_linear"
            else lx.lora_linear(*tensors, LORA_SCALE))


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad_enabled", "no_grad"])
@pytest.mark.parametrize("op, duals", [
    *((op, (name,)) for op, names in DUAL_ARGUMENTS.items() for name in names),
    *((op, names) for op, names in DUAL_ARGUMENTS.items()),
])
def test_forward_ad_dual_tensors_carry_the_tangent(args, lora_args, op, duals, grad_mode):
    primals = args if op == "lowrank_linear" else lora_args
    names = DUAL_ARGUMENTS[op]
    tangents = {n: torch.randn_like(p) for n, p in zip(names, primals) if n in duals}
    with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
        y = _call(op, *(fwAD.make_dual(p, tangents[n]) if n in tangents else p
                        for n, p in zip(names, primals)))
        value, tangent = fwAD.unpack_dual(y)
    assert tangent is not None, "the tangent was dropped"
    torch.testing.assert_close(value, _call(op, *primals))
    torch.testing.assert_close(tangent, _analytic_tangent(op, primals, tangents))


@pytest.mark.parametrize("make", [lambda: lx.LowRankLinear(10, 7, 3, dtype=torch.float64),
                                  lambda: lx.LoRALinear(nn.Linear(10, 7, dtype=torch.float64), 2)],
                         ids=["LowRankLinear", "LoRALinear"])
def test_forward_ad_through_a_module_whose_parameters_require_grad(make):
    module = make()
    if isinstance(module, lx.LoRALinear):
        with torch.no_grad():
            module.B.normal_()
        # The dense map module(x) = x·Wᵀ + b, formed in float64.
        W = module.base.weight + module.scale * module.B @ module.A
    else:
        W = module.B @ module.A
    W = W.detach()
    x, dx = _make(2, 3, 10), _make(2, 3, 10)
    with fwAD.dual_level():
        value, tangent = fwAD.unpack_dual(module(fwAD.make_dual(x, dx)))
    torch.testing.assert_close(tangent, dx @ W.T)
    # The same call still records the backward pass.
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value.square().sum(), params)
    module(x).square().sum().backward()
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_compiled_grad_over_the_functions_on_every_backend(args, lora_args, op, backend,
                                                           with_bias):
    # Under grad while compiling, the ops take the eager route, recorded as
    # one call of the graph: the eager backend raised ("cannot use C++
    # torch::autograd::Function with functorch transforms"), and fullgraph
    # compiles were refused on every backend.
    # Without a bias too (a layer built from nn.Linear(bias=False)): None
    # cannot cross the recorded call, which refused it.
    if op == "lowrank_linear":
        x, A, B, bias = args
        bias = bias if with_bias else None
        f = lambda a: lx.lowrank_linear(x, a, B, bias).pow(2).sum()  # noqa: E731
        ref = lambda a: _composition(x, a, B, bias).pow(2).sum()  # noqa: E731
    else:
        x, W, A, B, bias = lora_args
        bias = bias if with_bias else None
        f = lambda a: lx.lora_linear(x, W, a, B, bias, 0.5).pow(2).sum()  # noqa: E731
        ref = lambda a: _lora_composition(x, W, a, B, bias, 0.5).pow(2).sum()  # noqa: E731
    torch._dynamo.reset()
    try:
        got = torch.compile(grad(f), backend=backend, fullgraph=True)(A)
        torch.testing.assert_close(got, grad(ref)(A))
        torch.testing.assert_close(got, grad(f)(A), rtol=0, atol=0)  # the eager result
        per_sample = torch.compile(vmap(grad(f)), backend=backend, fullgraph=True)(
            torch.stack([A, 2 * A]))
        torch.testing.assert_close(per_sample[1], grad(ref)(2 * A))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear",
                                "lowrank_linear_with_intermediate",
                                "lora_linear_with_intermediate"])
def test_direct_op_calls_under_a_transform_name_the_function(args, op):
    # Both backends, and the _with_intermediate forms (which failed with an
    # internal NotImplementedError), refuse in one message naming what to call.
    x, A, B, bias = args
    function = op.replace("_with_intermediate", "")
    W = _make(7, 10)
    call = getattr(torch.ops.lowrank_ext, op)

    def f(a):
        y = call(x, a, B, bias) if function == "lowrank_linear" else call(x, W, a, B, bias, 0.5)
        return (y[0] if op != function else y).sum()

    message = (f"{op}: torch.ops.lowrank_ext.{op} cannot be differentiated under a torch.func "
               f"transform .*; call lowrank_ext.{function} \\(the Python function\\)")
    for transform in (grad, jacrev, lambda g: vmap(grad(g))):
        with pytest.raises(RuntimeError, match=message):
            transform(f)(A.unsqueeze(0) if transform not in (grad, jacrev) else A)
    # Outside a transform the op differentiates as before.
    a = A.clone().requires_grad_()
    f(a).backward()
    ref = ((lambda a: _composition(x, a, B, bias).sum()) if function == "lowrank_linear" else
           (lambda a: _lora_composition(x, W, a, B, bias, 0.5).sum()))
    torch.testing.assert_close(a.grad, grad(ref)(A))
