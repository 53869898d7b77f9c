"""torch.autocast: the fused ops follow F.linear's cast policy on both backends."""

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank_ext as lx
from conftest import TOLERANCES, requires_cuda

ops = torch.ops.lowrank_ext
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
LOW = [torch.bfloat16, torch.float16]


def _lowrank_args(device, M=5, k=40, r=6, d=24, dtype=torch.float32):
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)
    return make(M, k), make(r, k), make(d, r), make(d)


def _lora_args(device, M=5, k=40, r=6, d=24, dtype=torch.float32):
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)
    return make(M, k), make(d, k), make(r, k), make(d, r), make(d), 0.5


def _cast(args, dtype):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args)


CALLS = {
    "lowrank_linear": (lambda *a: lx.lowrank_linear(*a), _lowrank_args),
    "lowrank_linear_with_intermediate": (ops.lowrank_linear_with_intermediate, _lowrank_args),
    "lora_linear": (lambda *a: lx.lora_linear(*a), _lora_args),
    "lora_linear_with_intermediate": (ops.lora_linear_with_intermediate, _lora_args),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_float32_arguments_run_in_the_autocast_dtype(name, dtype, device):
    call, make_args = CALLS[name]
    args = make_args(device)
    saved = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.autocast(device, dtype=dtype):
        got = call(*args)
    # The same as calling the op on the cast arguments outside autocast.
    expected = call(*_cast(args, dtype))
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        assert torch.equal(g, e)
    # The caller's tensors are not touched.
    for a, s in zip(args, saved):
        if isinstance(a, torch.Tensor):
            assert a.dtype == torch.float32 and torch.equal(a, s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_matches_float64_reference_of_the_cast_arguments(dtype, device):
    x, A, B, bias = _lowrank_args(device, M=33, k=70, r=9, d=45)
    with torch.autocast(device, dtype=dtype):
        y = lx.lowrank_linear(x, A, B, bias)
    x64, A64, B64, b64 = (t.to(dtype).double() for t in (x, A, B, bias))
    expected = x64 @ (B64 @ A64).T + b64
    scale = expected.abs().max()
    torch.testing.assert_close(y.double() / scale, expected / scale, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_half_input_with_float32_weights(device):
    # The layer after an autocast F.linear sees a bfloat16 x and float32 weights.
    x, A, B, bias = _lowrank_args(device)
    fc = nn.Linear(40, 40, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        h = fc(x)
        assert h.dtype == torch.bfloat16
        y = lx.lowrank_linear(h, A, B, bias)
        z = lx.lora_linear(h, fc.weight, A, torch.randn(40, 6, device=device), fc.bias, 2.0)
    assert y.dtype == z.dtype == torch.bfloat16
    assert torch.equal(y, lx.lowrank_linear(*_cast((h, A, B, bias), torch.bfloat16)))


@pytest.mark.parametrize("device", DEVICES)
def test_outside_autocast_mixed_dtypes_still_raise(device):
    x, A, B, bias = _lowrank_args(device)
    with pytest.raises(TypeError, match="A has dtype float32 but x has dtype bfloat16"):
        lx.lowrank_linear(x.bfloat16(), A, B, bias)
    # autocast switched off inside an autocast region: no cast either.
    with torch.autocast(device, dtype=torch.bfloat16):
        with torch.autocast(device, enabled=False):
            y = lx.lowrank_linear(x, A, B, bias)
            with pytest.raises(TypeError, match="lowrank_linear: A has dtype"):
                lx.lowrank_linear(x.bfloat16(), A, B, bias)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_not_cast(device):
    # As in torch's autocast: float64 tensors keep their dtype, so float64 x
    # with float32 weights fails as it does for F.linear.
    x, A, B, bias = _lowrank_args(device, dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lx.lowrank_linear(x, A, B, bias)
        assert y.dtype == torch.float64
        with pytest.raises(TypeError, match="lowrank_linear: A has dtype bfloat16 but x has dtype float64"):
            lx.lowrank_linear(x, A.float(), B.float(), bias.float())
        with pytest.raises(RuntimeError):
            F.linear(x, A.float())


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_the_autocast_composition(device):
    x, A, B, bias = (t.requires_grad_() for t in _lowrank_args(device, M=16, k=64, r=8, d=32))
    gy = torch.randn(16, 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lx.lowrank_linear(x, A, B, bias)
        y_ref = F.linear(F.linear(x, A), B, bias)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, (x, A, B, bias), gy.bfloat16())
    grads_ref = torch.autograd.grad(y_ref, (x, A, B, bias), gy.bfloat16())
    for g, g_ref, t in zip(grads, grads_ref, (x, A, B, bias)):
        assert g.dtype == t.dtype == torch.float32  # through the cast's backward
        scale = g_ref.abs().max()
        torch.testing.assert_close(g / scale, g_ref / scale, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_modules_give_the_dtype_nn_linear_gives(device):
    model = nn.Sequential(nn.Linear(40, 32), lx.LowRankLinear(32, 24, 4),
                          lx.LoRALinear(nn.Linear(24, 16), 4)).to(device)
    x = torch.randn(3, 40, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = model(x)
        assert y.dtype == nn.Linear(24, 16).to(device)(x[:, :24]).dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_lora_linear_matches_peft_under_autocast(dtype, device):
    peft = pytest.importorskip("peft")
    base = nn.Linear(48, 32, device=device)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], init_lora_weights=False)
    peft_model = peft.get_peft_model(nn.Sequential(OrderedDict(fc=copy.deepcopy(base))), config)
    peft_layer = peft_model.base_model.model.fc
    ours = lx.LoRALinear(base, 4, 8)
    with torch.no_grad():
        ours.A.copy_(peft_layer.lora_A["default"].weight)
        ours.B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(6, 48, device=device)
    with torch.autocast(device, dtype=dtype):
        expected = peft_model(x)
        got = ours(x)
    assert got.dtype == expected.dtype == dtype
    scale = expected.abs().max()
    # peft rounds the base output and the adapter output separately; ours once.
    torch.testing.assert_close(got.float() / scale, expected.float() / scale,
                               **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_under_autocast_matches_eager(device):
    layer = lx.LowRankLinear(40, 24, 6).to(device)
    x = torch.randn(5, 40, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = layer(x)
        got = compiled(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_autocast_rules_are_registered_for_cpu_and_cuda(name, key):
    # Checked without a GPU: the CUDA rule must be there for when one is used.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_ext::{name}", key)


# --- torch.func transforms with torch.autocast inside the function -------------
# Under a transform the ops run as autograd.Functions above the autocast
# kernels; the arguments must be cast as those kernels cast them.

def _composition(name):
    if name == "lowrank_linear":
        return lambda x, A, B, bias: F.linear(F.linear(x, A), B, bias)
    return lambda x, W, A, B, bias, scale: (F.linear(x, W, bias)
                                            + scale * F.linear(F.linear(x, A), B))


FUNC_CALLS = {name: (CALLS[name][0], _composition(name), CALLS[name][1])
              for name in ("lowrank_linear", "lora_linear")}


def _autocast_loss(fn, device, scale):
    def loss(*tensors):
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fn(*tensors, *scale)
        return y.float().square().sum()
    return loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(FUNC_CALLS))
def test_func_grad_and_vjp_match_the_autocast_composition(name, device):
    ours, composition, make_args = FUNC_CALLS[name]
    args = make_args(device, M=16, k=64, r=8, d=32)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    scale = args[len(tensors):]
    argnums = tuple(range(len(tensors)))
    grads = torch.func.grad(_autocast_loss(ours, device, scale), argnums)(*tensors)
    grads_ref = torch.func.grad(_autocast_loss(composition, device, scale), argnums)(*tensors)
    for g, g_ref, t in zip(grads, grads_ref, tensors):
        assert g.dtype == g_ref.dtype == t.dtype == torch.float32
        torch.testing.assert_close(g / g_ref.abs().max(), g_ref / g_ref.abs().max(),
                                   **TOLERANCES[torch.bfloat16])
    # vjp: the output in the autocast dtype, the pullback back in float32.
    with torch.autocast(device, dtype=torch.bfloat16):
        y, pullback = torch.func.vjp(lambda *t: ours(*t, *scale), *tensors)
    assert y.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in pullback(torch.ones_like(y)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(FUNC_CALLS))
def test_func_jvp_tangent_has_the_primal_dtype(name, device):
    ours, composition, make_args = FUNC_CALLS[name]
    args = make_args(device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    scale = args[len(tensors):]
    tangents = tuple(torch.randn_like(t) for t in tensors)

    def under_autocast(fn):
        def call(*t):
            with torch.autocast(device, dtype=torch.bfloat16):
                return fn(*t, *scale)
        return call

    y, dy = torch.func.jvp(under_autocast(ours), tuple(tensors), tangents)
    y_ref, dy_ref = torch.func.jvp(under_autocast(composition), tuple(tensors), tangents)
    assert y.dtype == dy.dtype == dy_ref.dtype == torch.bfloat16
    torch.testing.assert_close(dy.float() / dy_ref.float().abs().max(),
                               dy_ref.float() / dy_ref.float().abs().max(),
                               **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_func_grad_of_a_lora_module_under_autocast(device):
    model = lx.LoRALinear(nn.Linear(40, 24), 4).to(device)
    with torch.no_grad():
        model.B.normal_()
    x = torch.randn(5, 40, device=device)

    def loss(params):
        with torch.autocast(device, dtype=torch.bfloat16):
            y = torch.func.functional_call(model, params, (x,))
        assert y.dtype == torch.bfloat16
        return y.float().square().sum()

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.func.grad(loss)(params)
    # Eager backward goes through the ops' autocast kernels.
    loss(dict(model.named_parameters())).backward()
    for n, g in grads.items():
        expected = model.get_parameter(n).grad
        assert g.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(g, expected)


def _float64_grads(fn, args):
    wide = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a
            for a in args]
    fn(*wide).sum().backward()
    return [a.grad for a in wide if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["lowrank_linear", "lora_linear"])
@pytest.mark.parametrize("M", [2, 8, 64])
def test_backward_inside_autocast_of_a_float32_call(name, M, device):
    # A float32 call in an autocast(enabled=False) island, its backward run
    # inside the autocast region: the compiled backward's products were cast
    # to bfloat16 one by one ("_weight_grad: a is bfloat16 but b is float32"
    # from 4 rows), the fallback's gave bfloat16-rounded gradients. Both now
    # compute in the dtypes the forward saved.
    fn, make = CALLS[name]
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a
            for a in make(device, M=M)]
    with torch.autocast(device, dtype=torch.bfloat16):
        with torch.autocast(device, enabled=False):
            y = fn(*args)
        assert y.dtype == torch.float32
        y.sum().backward()
    reference = (lambda x, A, B, b: F.linear(F.linear(x, A), B, b)) if name == "lowrank_linear" \
        else (lambda x, W, A, B, b, s: F.linear(x, W, b) + s * F.linear(F.linear(x, A), B))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    for got, expected in zip((a.grad for a in tensors), _float64_grads(reference, args)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_compiled_lora_with_a_new_scale_trains_under_autocast(dtype, device):
    # A half-type LoRALinear whose scale was set anew runs lowrank_linear on
    # float32 copies in an autocast(enabled=False) island (see
    # ops.lora_linear_changing_scale); AOTAutograd traced its backward under
    # the caller's autocast, which failed to compile.
    torch.manual_seed(0)
    layers = [lx.LoRALinear(nn.Linear(16, 8), rank=4).to(device=device, dtype=dtype)
              for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(5, 16, device=device, dtype=dtype)
    grads = []
    for layer, run in zip(layers, (lambda m: m, lambda m: torch.compile(m, backend="aot_eager"))):
        layer.scale = 2.0
        with torch.no_grad():
            layer.B.normal_(generator=torch.Generator(device).manual_seed(1))
        with torch.autocast(device, dtype=torch.bfloat16):
            y = run(layer)(x)
        y.float().sum().backward()
        grads.append((layer.A.grad, layer.B.grad))
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


def test_weights_formed_inside_an_autocast_region_keep_their_dtype_s_precision():
    # merge, unmerge, to_linear, PiSSA's residual, the refolding merge and the
    # randomized SVD ran their products in autocast's bfloat16: a float32
    # layer got a bfloat16-accurate weight (to_linear even a bfloat16 weight
    # beside a float32 bias, a layer that then did not run).
    torch.manual_seed(0)
    k = d = 64
    region = lambda: torch.autocast("cpu", dtype=torch.bfloat16)

    outside = lx.LoRALinear(nn.Linear(k, d), 8)
    with torch.no_grad():
        outside.B.normal_(std=0.02)
    inside = copy.deepcopy(outside)
    outside.merge()
    with region():
        inside.merge()
    assert torch.equal(inside.base.weight, outside.base.weight)
    with region():
        inside.unmerge()
    outside.unmerge()
    assert torch.equal(inside.base.weight, outside.base.weight)

    layer = lx.LowRankLinear(k, d, 16)
    with region():
        dense = layer.to_linear()
    assert dense.weight.dtype == torch.float32
    assert torch.equal(dense.weight, layer.to_linear().weight)

    base = nn.Linear(k, d)
    with region():
        pissa = lx.LoRALinear(copy.deepcopy(base), 8, init="pissa")
    assert torch.equal(pissa.base.weight, lx.LoRALinear(copy.deepcopy(base), 8,
                                                        init="pissa").base.weight)

    folded = [lx.LoRALinear(lx.LowRankLinear(k, d, 4), 8)]
    with torch.no_grad():
        folded[0].B.normal_(std=0.02)
    folded.append(copy.deepcopy(folded[0]))
    folded[0].merge()
    with region():
        folded[1].merge()
    for name in ("A", "B"):
        assert torch.equal(getattr(folded[1].base, name), getattr(folded[0].base, name))

    generator = lambda: torch.Generator().manual_seed(3)
    with region():
        B_in, A_in = lx.svd_truncate(base.weight.detach(), 8, method="randomized",
                                     generator=generator())
    B_out, A_out = lx.svd_truncate(base.weight.detach(), 8, method="randomized",
                                   generator=generator())
    assert torch.equal(B_in, B_out) and torch.equal(A_in, A_out)
