"""LowRankLinear and LoRALinear: outputs against float64 references, module plumbing, bad input."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lowrank_ext as lx
from conftest import TOLERANCES


def _linear64(d, k, bias=True):
    return nn.Linear(k, d, bias=bias, dtype=torch.float64)


# --- LowRankLinear -------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_dense_product(bias, dtype):
    layer = lx.LowRankLinear(24, 10, 4, bias=bias, dtype=dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    A, B = layer.A.double(), layer.B.double()
    ref = x.double() @ (B @ A).T + (layer.bias.double() if bias else 0)
    torch.testing.assert_close(layer(x).double(), ref, **TOLERANCES[dtype])


def test_parameters_and_repr():
    layer = lx.LowRankLinear(24, 10, 4)
    assert dict((n, tuple(p.shape)) for n, p in layer.named_parameters()) == {
        "A": (4, 24), "B": (10, 4), "bias": (10,)}
    assert layer.rank == 4
    assert "in_features=24, out_features=10, rank=4, bias=True" in repr(layer)


def test_init_matches_nn_linear_output_scale():
    # Var of the entries of B·A should be nn.Linear's 1/(3k); check the output
    # std of both on the same inputs, averaged over many draws.
    k, d, r = 256, 128, 16
    x = torch.randn(512, k)
    with torch.no_grad():
        ours = torch.stack([lx.LowRankLinear(k, d, r, bias=False)(x).std() for _ in range(8)]).mean()
        dense = torch.stack([nn.Linear(k, d, bias=False)(x).std() for _ in range(8)]).mean()
    assert 0.85 < float(ours / dense) < 1.15


@pytest.mark.parametrize("balanced", [False, True])
def test_from_linear_is_the_truncated_svd(balanced):
    linear = _linear64(12, 20)
    layer = lx.LowRankLinear.from_linear(linear, rank=5, balanced=balanced)
    U, S, Vh = torch.linalg.svd(linear.weight.detach())
    W5 = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    torch.testing.assert_close(layer.B.detach() @ layer.A.detach(), W5)
    torch.testing.assert_close(layer.bias.detach(), linear.bias.detach())
    assert layer.bias.data_ptr() != linear.bias.data_ptr()  # a copy, not shared
    assert layer.A.dtype == torch.float64


def test_from_linear_ratio_energy_tol():
    linear = _linear64(30, 50)
    assert lx.LowRankLinear.from_linear(linear, ratio=0.5).rank == math.floor(0.5 * 1500 / 80)
    assert lx.LowRankLinear.from_linear(linear, ratio=1e-6).rank == 1
    S = torch.linalg.svdvals(linear.weight.detach())
    energy_rank = lx.choose_rank(S, energy=0.9)
    assert lx.LowRankLinear.from_linear(linear, energy=0.9).rank == energy_rank
    layer = lx.LowRankLinear.from_linear(linear, tol=0.3)
    with torch.no_grad():
        err = (torch.linalg.matrix_norm(linear.weight - layer.B @ layer.A)
               / torch.linalg.matrix_norm(linear.weight))
    assert float(err) <= 0.3


def test_ratio_ranks_are_the_floor_of_the_decimal_ratio():
    """⌊ratio·d·k/(d+k)⌋ where that is an integer exactly: 0.09·50·40/90 = 2 is
    1.9999999999999998 in floating point, and gave 1."""
    from fractions import Fraction

    from lowrank_ext.nn import rank_for_ratio

    assert lx.LowRankLinear.from_linear(nn.Linear(50, 40), ratio=0.09).rank == 2
    for d in range(1, 41, 3):
        for k in range(1, 41, 2):
            for hundredths in range(1, 101):
                ratio = Fraction(hundredths, 100)
                expected = max(1, min(d, k, math.floor(ratio * d * k / (d + k))))
                assert rank_for_ratio(d, k, hundredths / 100) == expected, (d, k, ratio)


def test_a_numpy_float32_ratio_is_taken_as_its_value():
    # numpy keeps float32 · int in float32 (NEP 50), which holds d·k exactly
    # only below 2²⁴: the budget came out a rank too large.
    np = pytest.importorskip("numpy")
    from lowrank_ext.nn import rank_for_ratio

    d, k = 4906, 14726
    ratio = np.float32(0.4)
    expected = math.floor(float(ratio) * d * k / (d + k))
    assert rank_for_ratio(d, k, ratio) == expected == rank_for_ratio(d, k, float(ratio))
    assert expected * (d + k) <= float(ratio) * d * k


def test_from_linear_leaves_the_linear_alone():
    linear = _linear64(8, 8)
    before = copy.deepcopy(linear.state_dict())
    lx.LowRankLinear.from_linear(linear, rank=2)
    for key, value in linear.state_dict().items():
        assert torch.equal(value, before[key])


def test_conversions_keep_requires_grad_flags():
    linear = _linear64(8, 6)
    linear.weight.requires_grad_(False)
    layer = lx.LowRankLinear.from_linear(linear, rank=2)
    assert (layer.A.requires_grad, layer.B.requires_grad, layer.bias.requires_grad) == (
        False, False, True)
    back = layer.to_linear()
    assert (back.weight.requires_grad, back.bias.requires_grad) == (False, True)
    layer.bias.requires_grad_(False)
    layer.A.requires_grad_(True)
    back = layer.to_linear()
    assert (back.weight.requires_grad, back.bias.requires_grad) == (True, False)


@pytest.mark.parametrize("training", [True, False])
def test_conversions_keep_the_training_mode(training):
    linear = _linear64(8, 6).train(training)
    layer = lx.LowRankLinear.from_linear(linear, rank=2)
    assert layer.training is training and linear.training is training
    other = lx.LowRankLinear(6, 8, 2).train(training)
    assert other.to_linear().training is training and other.training is training


def test_to_linear_round_trip():
    layer = lx.LowRankLinear(16, 8, 3, dtype=torch.float64)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear)
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(linear(x), layer(x))
    assert lx.LowRankLinear(16, 8, 3, bias=False).to_linear().bias is None


def test_weight_is_a_placeholder_with_the_dense_metadata_only():
    layer = lx.LowRankLinear(16, 8, 3)
    w = layer.weight
    assert isinstance(w, torch.Tensor) and isinstance(w, lx.nn.WeightPlaceholder)
    assert w.shape == (8, 16) and w.size() == (8, 16) and w.dim() == 2
    assert w.dtype == torch.float32 and w.device == layer.A.device and not w.requires_grad
    with torch._C.DisableTorchFunctionSubclass():
        assert w.stride() == (0, 0)  # one element, broadcast: no memory
    assert "weight" not in layer.state_dict()
    assert all(p is not w for p in layer.parameters())
    # Any computation with it raises, naming the way to the dense matrix.
    x = torch.randn(2, 16)
    for use in (lambda: nn.functional.linear(x, layer.weight), lambda: layer.weight.sum(),
                lambda: layer.weight @ x.T, lambda: nn.init.normal_(layer.weight),
                lambda: layer.weight.clone()):
        with pytest.raises(RuntimeError, match=r"holds no values.*to_linear"):
            use()
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.to_linear().weight, layer.B @ layer.A)
    # Once read, it stays out of the module's copies and pickles.
    import pickle
    x64 = x.double()
    torch.testing.assert_close(copy.deepcopy(layer)(x64), layer(x64))
    torch.testing.assert_close(pickle.loads(pickle.dumps(layer))(x64), layer(x64))


def test_weight_dtype_check_compiles_and_exports():
    # transformers' T5 pattern: cast the input to the layer's weight dtype.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wo = lx.LowRankLinear(16, 8, 3)

        def forward(self, h):
            if isinstance(self.wo.weight, torch.Tensor) and h.dtype != self.wo.weight.dtype:
                h = h.to(self.wo.weight.dtype)
            return self.wo(h)

    block = Block()
    x = torch.randn(4, 16, dtype=torch.float64)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x))
    assert block(x).dtype == torch.float32
    # torch.export traces it too, strict (dynamo) and not (fake tensors).
    for strict in (False, True):
        program = torch.export.export(block, (x,), strict=strict)
        torch.testing.assert_close(program.module()(x), block(x))


@pytest.mark.parametrize("strict", [False, True])
def test_computing_with_the_weight_raises_under_export_too(strict):
    # Non-strict export traces on fake tensors; the placeholder must still
    # refuse to compute there, not trace NaN into the program.
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = lx.LowRankLinear(6, 5, 3)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.layer.weight)

    with pytest.raises(Exception, match="LowRankLinear.weight holds no values"):
        torch.export.export(ReadsWeight(), (torch.randn(2, 6),), strict=strict)


def test_state_dict_deepcopy_to_and_gradients():
    layer = lx.LowRankLinear(16, 8, 3)
    clone = lx.LowRankLinear(16, 8, 3)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(clone(x), layer(x))
    copied = copy.deepcopy(layer)
    torch.testing.assert_close(copied(x), layer(x))
    as64 = copy.deepcopy(layer).to(torch.float64)
    assert as64.A.dtype == as64.B.dtype == torch.float64
    torch.testing.assert_close(as64(x.double()).float(), layer(x))
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in layer.parameters())


def test_torch_compile():
    layer = lx.LowRankLinear(16, 8, 3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 16)
    torch.testing.assert_close(compiled(x), layer(x))


def test_ddp_single_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        layer = lx.LowRankLinear(16, 8, 3)
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(layer))
        x = torch.randn(5, 16)
        torch.testing.assert_close(ddp(x), layer(x))
        ddp(x).sum().backward()
        assert ddp.module.A.grad is not None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("args, error, match", [
    ((16, 8, 0), ValueError, "rank must be >= 1, got 0"),
    ((16, 8, -3), ValueError, "rank must be >= 1, got -3"),
    ((16, 8, 9), ValueError, "rank must be in \\[1, 8\\] .* got 9"),
    ((16, 8, 2.0), TypeError, "rank must be an int, got float"),
    ((16, 8, True), TypeError, "rank must be an int, got bool"),
    ((0, 8, 1), ValueError, "in_features must be >= 1, got 0"),
    ((16, "8", 1), TypeError, "out_features must be an int, got str"),
    ((16, 8, 2, 1), TypeError, "bias must be a bool, got int"),
    # Built, then failing in forward (complex) or in torch (integers) before.
    ((16, 8, 2, True, None, torch.complex64), TypeError,
     "dtype must be float32, float64, float16 or bfloat16, got complex64"),
    ((16, 8, 2, True, None, torch.int32), TypeError,
     "dtype must be float32, float64, float16 or bfloat16, got int32"),
    ((16, 8, 2, True, None, "float32"), TypeError,
     "dtype must be float32, float64, float16 or bfloat16, got 'float32'"),
    # Floating point, but the op takes none: failed in the initialisation.
    ((16, 8, 2, True, None, torch.float8_e4m3fn), TypeError,
     "dtype must be float32, float64, float16 or bfloat16, got float8_e4m3fn"),
])
def test_constructor_bad_input(args, error, match):
    with pytest.raises(error, match=f"LowRankLinear: {match}"):
        lx.LowRankLinear(*args)


def test_a_numpy_bool_bias_is_a_bool_as_for_nn_linear():
    import numpy as np

    assert lx.LowRankLinear(5, 4, 2, bias=np.bool_(False)).bias is None
    assert lx.LowRankLinear(5, 4, 2, bias=np.bool_(True)).bias.shape == (4,)


@pytest.mark.parametrize("make", [
    lambda: lx.LowRankLinear(16, 8, 3),
    lambda: lx.LoRALinear(nn.Linear(16, 8), 3),
    # Training with dropout runs the base layer on x first: x is checked before.
    lambda: lx.LoRALinear(nn.Linear(16, 8), 3, dropout=0.1).train(),
    lambda: lx.LoRALinear(nn.Linear(16, 8), 3, dropout=0.1, use_dora=True).train(),
], ids=["LowRankLinear", "LoRALinear", "LoRALinear-dropout", "DoRA-dropout"])
@pytest.mark.parametrize("x, error, match", [
    (torch.randn(2, 10), ValueError, "x has k=10 features in its last dimension \\(x shape "
                                     "\\[2, 10\\]\\)"),
    (torch.randn(2, 16, dtype=torch.float64), TypeError,
     "has dtype float32 but x has dtype float64"),
    (torch.ones(2, 16, dtype=torch.int64), TypeError,
     "x must be float32, float64, float16 or bfloat16, got int64"),
    (torch.tensor(1.0), ValueError, "x must have at least 1 dimension"),
    ([[1.0] * 16], TypeError, "x must be a Tensor, got list"),
], ids=["features", "dtype", "int", "0-d", "list"])
def test_forward_bad_input_names_x_and_what_was_seen(make, x, error, match):
    layer = make()
    with pytest.raises(error, match=match):
        layer(x)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_lora_training_with_dropout_refuses_x_as_inference_does(use_dora, autocast):
    lora = lx.LoRALinear(nn.Linear(16, 8), 3, dropout=0.1, use_dora=use_dora)
    context = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
               else torch.autocast("cpu", enabled=False))
    bad = [torch.randn(2, 10), torch.randn(2, 16, dtype=torch.float64), torch.tensor(1.0)]
    if not autocast:  # (autocast casts a bfloat16 x and float32 weights to one dtype)
        bad.append(torch.randn(2, 16, dtype=torch.bfloat16))
    for x in bad:
        errors = []
        for training in (False, True):
            lora.train(training)
            with context, pytest.raises((TypeError, ValueError)) as info:
                lora(x)
            errors.append((info.type, str(info.value)))
        assert errors[0] == errors[1] and errors[0][1].startswith("lora_linear: ")
    # What inference takes, training takes too (under autocast: float32 x, bfloat16 out).
    x = torch.randn(4, 16)
    for training in (False, True):
        with context:
            y = lora.train(training)(x)
        assert y.shape == (4, 8) and y.dtype == (torch.bfloat16 if autocast else torch.float32)


def test_from_factors_bad_input():
    A, B = torch.randn(2, 6), torch.randn(5, 2)
    make = lx.LowRankLinear.from_factors
    with pytest.raises(TypeError, match="from_factors: A must be a Tensor, got list"):
        make([[1.0]], B)
    with pytest.raises(TypeError, match="from_factors: bias must be a Tensor, got float"):
        make(A, B, 1.0)
    with pytest.raises(ValueError, match="from_factors: B must be 2-D, got shape \\[5\\]"):
        make(A, torch.randn(5))
    with pytest.raises(TypeError, match="from_factors: A must be float32, float64, float16 or "
                                        "bfloat16, got int64"):
        make(torch.ones(2, 6, dtype=torch.int64), B)
    # float8 factors built a layer whose forward and to_linear failed.
    with pytest.raises(TypeError, match="from_factors: B must be float32, float64, float16 or "
                                        "bfloat16, got float8_e5m2"):
        make(A, B.to(torch.float8_e5m2))
    with pytest.raises(ValueError, match="B has shape \\[5, 3\\] but A has shape \\[2, 6\\]"):
        make(A, torch.randn(5, 3))
    with pytest.raises(ValueError, match="from_factors: bias must have shape \\[d\\] = \\[5\\], "
                                         "got shape \\[6\\]"):
        make(A, B, torch.randn(6))
    # Nothing converted silently: one dtype and one device.
    with pytest.raises(TypeError, match="from_factors: B has dtype float64 but A has dtype "
                                        "float32"):
        make(A, B.double())
    with pytest.raises(TypeError, match="from_factors: bias has dtype int64 but A has dtype "
                                        "float32"):
        make(A, B, torch.ones(5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="from_factors: B is on meta but A is on cpu"):
        make(A, B.to("meta"))
    assert make(A, B, torch.randn(5)).rank == 2


def test_from_linear_bad_input():
    linear = _linear64(8, 6)
    with pytest.raises(TypeError, match="nn.Linear"):
        lx.LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), rank=1)
    with pytest.raises(ValueError, match="rank must be in \\[1, 6\\]"):
        lx.LowRankLinear.from_linear(linear, rank=7)
    with pytest.raises(ValueError, match="from_linear: rank must be >= 1, got -1"):
        lx.LowRankLinear.from_linear(linear, rank=-1)
    with pytest.raises(TypeError, match="from_linear: rank must be an int, got bool"):
        lx.LowRankLinear.from_linear(linear, rank=True)
    with pytest.raises(TypeError, match="from_linear: ratio must be a real number, got bool"):
        lx.LowRankLinear.from_linear(linear, ratio=True)
    for ratio in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            lx.LowRankLinear.from_linear(linear, ratio=ratio)
    with pytest.raises(ValueError, match="exactly one"):
        lx.LowRankLinear.from_linear(linear, rank=2, ratio=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        lx.LowRankLinear.from_linear(linear)
    # svd_truncate's checks, named as this call's.
    for kwargs, error, message in (
            ({"energy": 0}, ValueError, "energy must be in \\(0, 1\\], got 0"),
            ({"tol": -1}, ValueError, "tol must be >= 0, got -1"),
            ({"rank": 2, "method": "x"}, ValueError, "method must be 'exact' or 'randomized'"),
            ({"rank": 2, "balanced": 1}, TypeError, "balanced must be a bool, got int")):
        with pytest.raises(error, match=f"^LowRankLinear.from_linear: {message}"):
            lx.LowRankLinear.from_linear(linear, **kwargs)
    broken = _linear64(8, 6)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^LowRankLinear.from_linear: linear.weight contains NaN"):
        lx.LowRankLinear.from_linear(broken, rank=2)
    for kwargs in ({"rank": 1}, {"ratio": 0.5}, {"energy": 0.9}):
        with pytest.raises(ValueError, match=r"^LowRankLinear.from_linear: linear has an empty "
                                             r"weight \(5×0\)"):
            lx.LowRankLinear.from_linear(nn.Linear(0, 5), **kwargs)


# --- LoRALinear ----------------------------------------------------------------------
def _lora_reference(x, W, bias, A, B, scale):
    x, W, A, B = (t.detach().double() for t in (x, W, A, B))
    y = x @ W.T + scale * (x @ A.T) @ B.T
    return y if bias is None else y + bias.detach().double()


def test_lora_default_init_equals_base_and_freezes_it():
    base = nn.Linear(20, 12)
    reference = copy.deepcopy(base)
    lora = lx.LoRALinear(base, 4, alpha=8)
    assert lora.scale == 2.0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert lora.A.requires_grad and lora.B.requires_grad
    assert torch.count_nonzero(lora.B) == 0 and torch.count_nonzero(lora.A) > 0
    x = torch.randn(3, 20)
    torch.testing.assert_close(lora(x), reference(x))
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["A", "B"]


def test_lora_forward_matches_reference_and_trains_only_adapter():
    lora = lx.LoRALinear(nn.Linear(20, 12), 4, alpha=6)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(2, 3, 20)
    ref = _lora_reference(x, lora.base.weight, lora.base.bias, lora.A, lora.B, 1.5)
    torch.testing.assert_close(lora(x).double(), ref, **TOLERANCES[torch.float32])
    lora(x).sum().backward()
    assert lora.A.grad is not None and lora.B.grad is not None
    assert lora.base.weight.grad is None


def test_lora_pissa_keeps_output_and_holds_principal_part():
    base = nn.Linear(20, 12, dtype=torch.float64)
    W = base.weight.detach().clone()
    x = torch.randn(5, 20, dtype=torch.float64)
    before = base(x)
    lora = lx.LoRALinear(base, 3, alpha=6, init="pissa")
    torch.testing.assert_close(lora(x), before)
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(lora.scale * lora.B.detach() @ lora.A.detach(),
                               U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])
    # Balanced: the factors share the singular values evenly.
    torch.testing.assert_close(lora.A.norm(dim=1), lora.B.norm(dim=0))


def test_lora_gaussian_init():
    torch.manual_seed(0)
    base = nn.Linear(3000, 12, dtype=torch.float64)
    lora = lx.LoRALinear(base, 4, init="gaussian")
    assert torch.count_nonzero(lora.B) == 0
    assert abs(float(lora.A.std()) - 1 / 4) < 0.01  # peft's std = 1/rank
    x = torch.randn(5, 3000, dtype=torch.float64)
    torch.testing.assert_close(lora(x), base(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_lora_fast_pissa_keeps_output_and_finds_the_principal_part(dtype):
    torch.manual_seed(0)
    # A clear spectral gap after 3 values: the randomized SVD finds them.
    W = (torch.randn(40, 3, dtype=torch.float64) * 5) @ torch.randn(3, 30, dtype=torch.float64)
    W += 0.01 * torch.randn(40, 30, dtype=torch.float64)
    base = nn.Linear(30, 40, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(W)
    x = torch.randn(6, 30, dtype=dtype)
    before = base(x)
    lora = lx.LoRALinear(base, 3, alpha=6, init="pissa_niter_4")
    tol = dict(rtol=2e-2, atol=2e-1) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(lora(x), before, **tol)
    U, S, Vh = torch.linalg.svd(W)
    principal = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    got = lora.scale * lora.B.detach().double() @ lora.A.detach().double()
    assert float((got - principal).norm() / principal.norm()) < (1e-2 if dtype == torch.bfloat16
                                                                 else 1e-4)


def test_lora_merge_unmerge():
    lora = lx.LoRALinear(nn.Linear(20, 12, dtype=torch.float64), 4, alpha=2)
    with torch.no_grad():
        lora.B.normal_()
    W0 = lora.base.weight.detach().clone()
    x = torch.randn(3, 20, dtype=torch.float64)
    unmerged = lora(x)
    lora.merge()
    assert lora.merged
    torch.testing.assert_close(lora(x), unmerged)
    torch.testing.assert_close(lora.base.weight.detach(), W0 + 0.5 * lora.B @ lora.A)
    with pytest.warns(UserWarning, match="already merged"):
        lora.merge()
    lora.unmerge()
    assert not lora.merged
    torch.testing.assert_close(lora.base.weight.detach(), W0)
    torch.testing.assert_close(lora(x), unmerged)


@pytest.mark.parametrize("base", ["linear", "lowrank"])
@pytest.mark.parametrize("scale, error, match", [
    (math.nan, ValueError, "scale must be finite, got nan"),
    (-math.inf, ValueError, "scale must be finite, got -inf"),
    pytest.param(10 ** 400, ValueError, "int beyond float's range", id="huge-int"),
    ("2", TypeError, "scale must be a real number, got str"),
    (True, TypeError, "scale must be a real number, got bool"),
    (torch.tensor(2.0), TypeError, "scale must be a real number, got Tensor"),
])
def test_lora_scale_set_anew_is_checked_where_it_is_set(base, scale, error, match):
    # merge() folds the scale into the base weight, where a NaN would stay
    # after unmerge(), and a LowRankLinear base's forward never reaches the
    # fused op's own check: both need a scale checked when it is set.
    inner = (nn.Linear(16, 12, dtype=torch.float64) if base == "linear"
             else lx.LowRankLinear(16, 12, 2, dtype=torch.float64))
    lora = lx.LoRALinear(inner, 2)
    before = copy.deepcopy(lora.state_dict())
    with pytest.raises(error, match=match):
        lora.scale = scale
    assert lora.scale == 1.0 and not lora._scale_changed
    lora.merge().unmerge()
    for key, value in lora.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-15)
    lora.scale = np.float32(0.5)  # any real number, kept as a float
    assert type(lora.scale) is float and lora.scale == 0.5


def test_lora_dropout_reaches_only_the_adapter():
    lora = lx.LoRALinear(nn.Linear(20, 12), 4, dropout=0.5)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(64, 20)
    lora.train()
    torch.manual_seed(1)
    y = lora(x)
    torch.manual_seed(1)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    ref = lora.base(x) + lora.scale * (mask_x @ lora.A.T) @ lora.B.T
    torch.testing.assert_close(y, ref)
    lora.eval()
    torch.testing.assert_close(
        lora(x).double(),
        _lora_reference(x, lora.base.weight, lora.base.bias, lora.A, lora.B, lora.scale),
        **TOLERANCES[torch.float32])


def test_lora_state_dict_and_compile():
    lora = lx.LoRALinear(nn.Linear(20, 12), 4)
    assert set(lora.state_dict()) == {"A", "B", "base.weight", "base.bias"}
    x = torch.randn(3, 20)
    compiled = torch.compile(lora, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lora(x))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=-2), ValueError, "rank must be >= 1, got -2"),
    (dict(rank=True), TypeError, "rank must be an int, got bool"),
    (dict(rank=2.0), TypeError, "rank must be an int, got float"),
    (dict(rank=2, dropout=-0.1), ValueError, "dropout must be in \\[0, 1\\), got -0.1"),
    (dict(rank=2, dropout="0.1"), TypeError, "dropout must be a real number, got str"),
    (dict(rank=13), ValueError, "rank must be in \\[1, 12\\]"),
    (dict(rank=2, alpha=0), ValueError, "alpha"),
    (dict(rank=2, alpha=float("inf")), ValueError, "alpha"),
    (dict(rank=2, alpha=10**400), ValueError,
     "LoRALinear: alpha must be finite and > 0, got an int beyond float's range"),
    (dict(rank=2, init="xavier"), ValueError, "init"),
    (dict(rank=2, dropout=1.0), ValueError, "dropout"),
    (dict(rank=2, alpha="8"), TypeError, "alpha"),
])
def test_lora_bad_input_leaves_base_alone(kwargs, error, match):
    base = nn.Linear(20, 12)
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(error, match=match):
        lx.LoRALinear(base, **kwargs)
    assert base.weight.requires_grad
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key])


def test_lora_rejects_non_linear():
    with pytest.raises(TypeError,
                       match="base must be an nn.Linear, a LowRankLinear or a transformers Conv1D"):
        lx.LoRALinear(nn.Conv1d(3, 3, 1), 1)
    # A dynamically quantized Linear is also called Linear: its full name says
    # which (the message said "got Linear"), with the way out.
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)))[0]
    with pytest.raises(TypeError, match=r"got torch\.ao\.nn\.quantized\.dynamic\.modules\."
                                        r"linear\.Linear; quantize after lx\.merge_lora"):
        lx.LoRALinear(quantized, 1)
    integer = nn.Linear(4, 4)
    integer.weight = nn.Parameter(integer.weight.detach().to(torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="base must have a float32, float64, float16 or bfloat16 "
                                        "weight, got int64"):
        lx.LoRALinear(integer, 2)
    integer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
                                  requires_grad=False)
    with pytest.raises(TypeError, match="weight, got float8_e4m3fn"):
        lx.LoRALinear(integer, 2, use_dora=True)


def test_lora_merge_warnings_point_at_the_caller():
    lora = lx.LoRALinear(nn.Linear(4, 4), 2)
    with pytest.warns(UserWarning, match="not merged") as record:
        lora.unmerge()
    lora.merge()
    with pytest.warns(UserWarning, match="already merged") as again:
        lora.merge()
    assert record[0].filename == again[0].filename == __file__


class _ScaledLinear(nn.Linear):
    """An nn.Linear subclass computing another function than nn.Linear's."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_linear_subclasses_with_a_forward_of_their_own_are_refused():
    # The layers compute with the weight and never call the subclass's forward.
    base = _ScaledLinear(8, 6)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(TypeError, match=r"LoRALinear: base is a _ScaledLinear, an nn.Linear "
                                        r"subclass with a forward of its own"):
        lx.LoRALinear(base, 2)
    with pytest.raises(TypeError, match=r"LowRankLinear.from_linear: linear is a _ScaledLinear"):
        lx.LowRankLinear.from_linear(base, rank=6)
    assert all(p.requires_grad for p in base.parameters())  # not frozen: left as it was
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_linear_subclasses_keeping_nn_linears_forward_are_taken():
    # nn.MultiheadAttention's out_proj is torch's NonDynamicallyQuantizableLinear.
    layer = nn.MultiheadAttention(8, 2, dtype=torch.float64).out_proj
    assert type(layer) is not nn.Linear
    x = torch.randn(3, 8, dtype=torch.float64)
    full = lx.LowRankLinear.from_linear(layer, rank=8)
    torch.testing.assert_close(full(x), x @ layer.weight.T + layer.bias)
    lora = lx.LoRALinear(layer, 2)
    with torch.no_grad():
        lora.B.normal_()
    torch.testing.assert_close(lora(x), _lora_reference(x, layer.weight, layer.bias, lora.A,
                                                        lora.B, lora.scale))


class _ReshapesByTheWeight(nn.Module):
    """Code that reads a layer's sizes off its weight (out_features = weight.shape[0])."""

    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x).view(-1, self.proj.weight.shape[0] // 2, 2).to(self.proj.weight.dtype)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace's deprecation
def test_jit_trace_reads_the_weights_metadata_and_checks_its_trace():
    layer = lx.LowRankLinear(16, 8, 4)
    model = _ReshapesByTheWeight(layer).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(3, 16))  # check_trace on, as by default
        # No placeholder kept in the graph: the sizes went in as numbers.
        assert not any(node.kind() == "prim::Constant" and node.output().type().kind() ==
                       "TensorType" for node in traced.inlined_graph.nodes())
        x = torch.randn(5, 16)
        expected = ((x.double() @ (layer.B @ layer.A).double().T + layer.bias.double())
                    .view(5, 4, 2))
        torch.testing.assert_close(traced(x).double(), expected, **TOLERANCES[torch.float32])
    # Computing with the weight still raises while tracing.
    reads_values = _ReshapesByTheWeight(layer)
    reads_values.forward = lambda x: x @ reads_values.proj.weight.T
    with pytest.raises(RuntimeError, match="holds no values"):
        torch.jit.trace(reads_values, torch.randn(3, 16))


def test_fx_symbolic_trace_records_the_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), lx.LowRankLinear(6, 5, 3),
                          lx.LoRALinear(nn.Linear(5, 4), 2))
    with torch.no_grad():
        model[2].B.normal_()
    traced = torch.fx.symbolic_trace(model)
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert torch.ops.lowrank_ext.lowrank_linear.default in targets
    assert torch.ops.lowrank_ext.lora_linear.default in targets
    x = torch.randn(3, 6)
    torch.testing.assert_close(traced(x), model(x))


# --- layers put into torch's Transformer encoder by hand -------------------------------
def _dense_weight_of(layer):
    """The dense weight a layer applies, formed in float64 from its parameters."""
    if isinstance(layer, lx.LowRankLinear):
        return layer.B.detach().double() @ layer.A.detach().double()
    W = layer.base.weight.detach().double()
    V = W + layer.scale * layer.B.detach().double() @ layer.A.detach().double()
    if not layer.use_dora:
        return V
    return (layer.magnitude.detach().double() / torch.linalg.vector_norm(V, dim=1))[:, None] * V


def _with_dense_layers(module, names):
    """A copy of ``module`` whose layers ``names`` are nn.Linear with their dense weights."""
    reference = copy.deepcopy(module)
    for name in names:
        layer = reference.get_submodule(name)
        dense = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            dense.weight.copy_(_dense_weight_of(layer))
            dense.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, dense)
    return reference


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_lora_layer_put_into_an_encoder_layer_by_hand_is_applied(use_dora):
    # In inference, nn.TransformerEncoderLayer's fused path reads linear1.weight
    # (the base layer's) and never calls linear1.
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True,
                                       dropout=0.0).eval()
    layer.linear1 = lx.LoRALinear(layer.linear1, 4, use_dora=use_dora).eval()
    with torch.no_grad():
        layer.linear1.B.normal_()
    reference = _with_dense_layers(layer, ["linear1"])
    without = copy.deepcopy(layer)
    without.linear1 = without.linear1.base
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = reference(x)
        assert (expected - without(x)).abs().max() > 0.1  # the adapter matters
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # with gradients


@pytest.mark.parametrize("where, kind", [(0, "lora"), (1, "lora"), (1, "lowrank")])
def test_layers_put_into_an_encoder_by_hand_take_its_packed_batches(where, kind):
    # With a padding mask, nn.TransformerEncoder packs the batch into a nested
    # tensor when its first layer's weights allow it, and every layer gets it.
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0),
        2, enable_nested_tensor=True).eval()
    name = f"layers.{where}.linear1"
    linear = encoder.get_submodule(name)
    if kind == "lora":
        new = lx.LoRALinear(linear, 4).eval()
        with torch.no_grad():
            new.B.normal_()
    else:
        new = lx.LowRankLinear.from_linear(linear, rank=4)
    encoder.layers[where].linear1 = new
    reference = _with_dense_layers(encoder, [name])
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, 4:] = padding[2, 2:] = True
    seen = []
    new.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_nested))
    with torch.no_grad():
        got = encoder(x, src_key_padding_mask=padding)
        expected = reference(x, src_key_padding_mask=padding)
    assert seen == [True]  # the packed path was taken
    torch.testing.assert_close(got[~padding], expected[~padding], rtol=1e-5, atol=1e-5)


def test_layers_built_under_inference_mode_can_be_trained():
    # from_linear, from_factors and to_linear made inference tensors there:
    # Parameters that said they required gradients and could never be
    # trained (compress_model already built its layers outside).
    torch.manual_seed(0)
    linear, x = nn.Linear(16, 8), torch.randn(4, 16)
    with torch.inference_mode():
        low = lx.LowRankLinear.from_linear(linear, rank=4)
        built = lx.LowRankLinear.from_factors(low.A, low.B, low.bias)
        dense = low.to_linear()
    for layer in (low, built, dense):
        assert not any(p.is_inference() for p in layer.parameters())
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        layer(x).sum().backward()
        optimizer.step()
        layer.load_state_dict(layer.state_dict())


def test_from_linear_randomized_takes_niter_and_a_generator():
    # method="randomized" drew from torch's global generator and took neither
    # niter nor a generator, though documented as working as in svd_truncate.
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    state = torch.get_rng_state()
    layers = [lx.LowRankLinear.from_linear(linear, rank=6, method="randomized", niter=1,
                                           generator=torch.Generator().manual_seed(3))
              for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(layers[0].A, layers[1].A) and torch.equal(layers[0].B, layers[1].B)
    B, A = lx.svd_truncate(linear.weight.detach(), 6, method="randomized", niter=1,
                           generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layers[0].B @ layers[0].A, B @ A)
