"""DoRA (LoRALinear(use_dora=True), add_lora(use_dora=True)): against an
independent float64 formula and against peft's DoRA on the same weights."""

import copy
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lowrank_ext as lx
import lowrank_ext.lora_layer as lora_layer
from conftest import DTYPES
from reference import assert_close_to_reference


def _dora(base, rank=3, alpha=6.0, **kwargs):
    """A DoRA layer over ``base`` with random B and magnitude, so both matter."""
    lora = lx.LoRALinear(base, rank, alpha, use_dora=True, **kwargs)
    with torch.no_grad():
        lora.B.normal_()
        lora.magnitude.mul_(torch.rand_like(lora.magnitude) + 0.5)
    return lora


def _reference(lora, x):
    """float64 m / ‖W + sBA‖_row ⊙ (x·(W + sBA)ᵀ) + bias, formed densely."""
    with torch.no_grad():
        weight = lora.base.weight.double() + lora.scale * (lora.B.double() @ lora.A.double())
        factor = lora.magnitude.double() / torch.linalg.vector_norm(weight, dim=1)
        y = (x.double() @ weight.T) * factor
        return y if lora.base.bias is None else y + lora.base.bias.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_the_float64_formula(dtype, bias):
    lora = _dora(nn.Linear(24, 20, bias=bias, dtype=dtype))
    for shape in [(7, 24), (2, 3, 24), (0, 24)]:
        x = torch.randn(shape, dtype=dtype)
        assert_close_to_reference(lora(x), _reference(lora, x), dtype)


def test_starts_equal_to_the_base_layer():
    base = nn.Linear(24, 20, dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64)
    expected = base(x)
    lora = lx.LoRALinear(base, 4, use_dora=True)
    torch.testing.assert_close(lora.magnitude, torch.linalg.vector_norm(base.weight, dim=1))
    torch.testing.assert_close(lora(x), expected, rtol=1e-12, atol=1e-12)
    assert "use_dora=True" in repr(lora)
    assert not lx.LoRALinear(nn.Linear(4, 4), 2).use_dora


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_norm_equals_the_formed_sum_in_blocks_of_rows(monkeypatch, dtype):
    lora = _dora(nn.Linear(40, 30, dtype=dtype))
    with torch.no_grad():  # a row that cancels out: its norm is 0, not NaN
        lora.base.weight[3] = -lora.scale * (lora.B[3] @ lora.A)
    with torch.no_grad():
        formed = torch.linalg.vector_norm(
            lora.base.weight.double() + lora.scale * (lora.B.double() @ lora.A.double()), dim=1)
    norms = lora_layer.dora_row_norms(lora.base.weight, lora.B, lora.A, lora.scale)
    assert norms.dtype == dtype and torch.isfinite(norms).all()
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    rest = torch.arange(30) != 3
    torch.testing.assert_close(norms.double()[rest], formed[rest], rtol=tol,
                               atol=tol * formed.max())
    # The cancelling row keeps what rounding leaves of it (~ε·‖W₃‖).
    assert float(norms[3]) <= 1e-3 * float(lora.base.weight[3].double().norm()) + formed[3]
    monkeypatch.setattr(lora_layer, "_NORM_BLOCK_BYTES", 4 * 40 * 7)  # 7 rows a block
    blocks = lora_layer.dora_row_norms(lora.base.weight, lora.B, lora.A, lora.scale)
    torch.testing.assert_close(blocks, norms, rtol=1e-6, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_norm_is_float32_inside_an_autocast_region(compiled):
    # Autocast reached the products inside the norms and ran them in
    # bfloat16: relative errors of 8e-5 in eager mode and 3e-3 compiled,
    # where float32 gives 2e-7, a per-row error on every output.
    torch.manual_seed(0)
    lora = lx.LoRALinear(nn.Linear(512, 64), 8, use_dora=True)
    nn.init.normal_(lora.B, std=0.1)
    with torch.no_grad():
        formed = torch.linalg.vector_norm(
            lora.base.weight.double() + lora.scale * (lora.B.double() @ lora.A.double()), dim=1)
    norms = lora_layer.dora_row_norms
    if compiled:
        norms = torch.compile(norms, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = norms(lora.base.weight, lora.B, lora.A, lora.scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), formed, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_norm_stays_accurate_where_the_adapter_cancels_most_of_a_row(dtype):
    # Expanding ‖W_i + s·(BA)_i‖² as ‖W_i‖² + 2s·(W·Aᵀ)_i·B_i + s²·‖(BA)_i‖² in
    # float32 lost eps·‖W_i‖²/‖W_i + s·(BA)_i‖² of it: 0.1 with 99.9 % taken away.
    d, k, r = 8, 64, 4
    for kept in (1e-1, 1e-2, 1e-3):
        lora = lx.LoRALinear(nn.Linear(k, d, dtype=dtype), r, use_dora=True)
        with torch.no_grad():  # W in A's row space, and s·B·A all of it but `kept`
            P, A = torch.randn(d, r, dtype=torch.float64), torch.randn(r, k, dtype=torch.float64)
            lora.A.copy_(A)
            lora.base.weight.copy_(P @ A)
            lora.B.copy_(-(1 - kept) / lora.scale * P)
        weight = lora.base.weight.double() + lora.scale * (lora.B.double() @ lora.A.double())
        exact = torch.linalg.vector_norm(weight, dim=1)
        norms = lora_layer.dora_row_norms(lora.base.weight, lora.B, lora.A, lora.scale)
        # Half types: the float32 norm rounded once.
        rtol = 1e-4 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(norms.double(), exact, rtol=rtol, atol=0)
        if dtype == torch.float32:
            x = torch.randn(5, k)
            with torch.no_grad():
                expected = _reference(lora, x)
                # The product x·(W + s·B·A)ᵀ, from x·Wᵀ and s·(x·Aᵀ)·Bᵀ, cancels
                # as much: it keeps about eps·√k·‖W_i‖/‖W_i + s·(BA)_i‖ of rounding.
                tol = max(1e-4, torch.finfo(dtype).eps * k ** 0.5 / kept)
                torch.testing.assert_close(lora(x).double(), expected, rtol=tol,
                                           atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("condition", [1e2, 1e3, 1e4])
def test_the_norm_stays_accurate_where_the_adapter_cancels_within_itself(condition):
    # B_i·(A·Aᵀ)·B_iᵀ cancels within itself where A is ill-conditioned and B_i
    # points along its weak directions: the check compared the expansion with
    # ‖W_i‖² + s²·‖(BA)_i‖², which that cancellation hides, and kept rows
    # 1e-2 off (condition 1e4) unrecomputed.
    g = torch.Generator().manual_seed(0)
    d, k, r, s = 64, 512, 8, 2.0
    W = torch.randn(d, k, generator=g) / k ** 0.5
    U, _ = torch.linalg.qr(torch.randn(r, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(k, r, generator=g))
    singular = torch.logspace(0, -math.log10(condition), r)
    A = (U * singular) @ V.T / 10
    B = (torch.randn(d, r, generator=g) / singular) @ U.T * 10 / r ** 0.5 / s
    exact = torch.linalg.vector_norm(W.double() + s * B.double() @ A.double(), dim=1)
    norms = lora_layer.dora_row_norms(W, B, A, s)
    torch.testing.assert_close(norms.double(), exact, rtol=2e-5, atol=0)


@pytest.mark.parametrize("path", ["eager", "compiled", "vmap", "traced"])
def test_the_norm_of_cancelled_rows_on_every_path(path, monkeypatch):
    # Eager CPU calls expand the square and recompute the cancelled rows from
    # the sum; compiled, transformed and traced calls form the sum block by
    # block (a trace made where no row cancels would replay none recomputed).
    # Small blocks, so that both run over several.
    monkeypatch.setattr(lora_layer, "_NORM_BLOCK_BYTES", 4 * 64 * 3)
    d, k, r, scale = 40, 64, 4, 2.0
    A, B = torch.randn(r, k), torch.randn(d, r)
    W = torch.randn(d, k)
    cancel = torch.arange(0, d, 2)  # every other row 99.9 % cancelled
    W[cancel] = -scale * (B[cancel] @ A) / 0.999
    exact = torch.linalg.vector_norm(W.double() + scale * (B.double() @ A.double()), dim=1)
    if path == "eager":
        norms = lora_layer.dora_row_norms(W, B, A, scale)
    elif path == "compiled":
        torch._dynamo.reset()
        norms = torch.compile(lora_layer.dora_row_norms, backend="aot_eager", fullgraph=True)(
            W, B, A, scale)
    elif path == "vmap":
        norms = torch.vmap(lambda b: lora_layer.dora_row_norms(W, b, A, scale))(B[None])[0]
    else:
        with warnings.catch_warnings():  # the tracer's deprecation and its TracerWarnings
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(lambda W, B, A: lora_layer.dora_row_norms(W, B, A, scale),
                                     (torch.randn(d, k), B, A))  # no row cancels here
        norms = traced(W, B, A)
    torch.testing.assert_close(norms.double(), exact, rtol=1e-4, atol=0)


def _peft_pair(dtype=torch.float64, **config):
    """(peft model, our model) over copies of one model, peft's random DoRA adapters in both."""
    peft = pytest.importorskip("peft")
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(12, 32, dtype=dtype), act=nn.GELU(),
                                      fc2=nn.Linear(32, 8, dtype=dtype)))
    ours = copy.deepcopy(model)
    config = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=True,
                  init_lora_weights=False, **config)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    lx.add_lora(ours, 4, 8, include=["fc1", "fc2"], use_dora=True,
                rslora=config.get("use_rslora", False), dropout=config.get("lora_dropout", 0.0))
    _copy_adapters(peft_model, ours, ("fc1", "fc2"), move_magnitudes=True)
    return peft_model, ours


@torch.no_grad()
def _copy_adapters(peft_model, ours, names, move_magnitudes=False):
    """Give our layers peft's A, B and magnitude (moved off its start in both, if asked)."""
    inner = peft_model.base_model.model
    for name in names:
        theirs, mine = inner.get_submodule(name), ours.get_submodule(name)
        mine.A.copy_(theirs.lora_A["default"].weight)
        mine.B.copy_(theirs.lora_B["default"].weight)
        magnitude = theirs.lora_magnitude_vector["default"].weight
        if move_magnitudes:
            magnitude.mul_(torch.rand_like(magnitude) + 0.5)
        mine.magnitude.copy_(magnitude)


@pytest.mark.parametrize("config", [dict(), dict(use_rslora=True)])
def test_outputs_and_gradients_equal_peft(config):
    peft_model, ours = _peft_pair(**config)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    expected = peft_model(x)
    torch.testing.assert_close(ours(x_ours), expected)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    ours(x_ours).backward(grad)
    torch.testing.assert_close(x_ours.grad, x.grad)
    inner = peft_model.base_model.model
    for name in ("fc1", "fc2"):
        theirs, mine = inner.get_submodule(name), ours.get_submodule(name)
        torch.testing.assert_close(mine.A.grad, theirs.lora_A["default"].weight.grad)
        torch.testing.assert_close(mine.B.grad, theirs.lora_B["default"].weight.grad)
        torch.testing.assert_close(mine.magnitude.grad,
                                   theirs.lora_magnitude_vector["default"].weight.grad)
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in ours.parameters()) == total


def test_dropout_in_training_equals_peft():
    peft_model, ours = _peft_pair(lora_dropout=0.3)
    peft_model.train()
    ours.train()
    x = torch.randn(16, 12, dtype=torch.float64)
    torch.manual_seed(5)
    expected = peft_model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(ours(x), expected)


def test_merge_and_unmerge_equal_peft():
    peft_model, ours = _peft_pair()
    x = torch.randn(6, 12, dtype=torch.float64)
    expected = peft_model(x)
    weight_before = ours.fc1.base.weight.detach().clone()
    ours.fc1.merge()
    torch.testing.assert_close(ours(x), expected)
    ours.fc1.unmerge()
    torch.testing.assert_close(ours.fc1.base.weight, weight_before, rtol=1e-12, atol=1e-12)
    assert "_dora_norms" not in dict(ours.fc1.named_buffers())

    merged_peft = peft_model.merge_and_unload()
    assert lx.merge_lora(ours) == ["fc1", "fc2"]
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(ours.get_submodule(name).weight,
                                   merged_peft.get_submodule(name).weight)
    torch.testing.assert_close(ours(x), expected)


def test_adapters_with_magnitudes_save_load_and_train(tmp_path):
    _, ours = _peft_pair()
    state = lx.lora_state_dict(ours)
    assert list(state) == ["fc1.A", "fc1.B", "fc1.magnitude", "fc2.A", "fc2.B",
                           "fc2.magnitude"]
    other = copy.deepcopy(ours)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.zero_()
    lx.load_lora_state_dict(other, {k: v.clone() for k, v in state.items()})
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(other(x), ours(x), rtol=0, atol=0)

    teacher = copy.deepcopy(ours)
    with torch.no_grad():
        teacher.fc1.magnitude.mul_(1.5)  # something for the student to learn
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    lx.distill(ours, teacher, [torch.randn(16, 12, dtype=torch.float64)], steps=3, lr=1e-2,
               progress=False)
    changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(state)  # the adapters with their magnitudes, nothing else


def test_from_peft_and_save_peft_adapter_carry_dora(tmp_path):
    peft = pytest.importorskip("peft")
    peft_model, _ = _peft_pair()
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = peft_model(x)
    model = lx.from_peft(peft_model)
    assert model.fc1.use_dora and model.fc2.use_dora
    torch.testing.assert_close(model(x), expected)

    lx.save_peft_adapter(model, tmp_path / "adapter")
    fresh = nn.Sequential(OrderedDict(fc1=nn.Linear(12, 32, dtype=torch.float64),
                                      act=nn.GELU(),
                                      fc2=nn.Linear(32, 8, dtype=torch.float64)))
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            fresh.get_submodule(name).load_state_dict(model.get_submodule(name).base.state_dict())
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), expected)


def test_from_peft_keeps_a_merged_dora_layer_unmergeable():
    peft_model, _ = _peft_pair()
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = peft_model(x)
    peft_model.base_model.model.fc1.merge()
    model = lx.from_peft(peft_model)
    assert model.fc1.merged
    torch.testing.assert_close(model(x), expected)
    model.fc1.unmerge()
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unmerge_on_the_meta_device(use_dora):
    # Shapes only: no values for unmerge's check of rows a zero magnitude erased.
    lora = lx.LoRALinear(nn.Linear(8, 4, device="meta"), 2, use_dora=use_dora)
    lora.merge()
    assert lora.merged and lora.base.weight.is_meta
    lora.unmerge()
    assert not lora.merged and lora.base.weight.is_meta and lora.base.weight.shape == (4, 8)
    assert "_dora_norms" not in dict(lora.named_buffers())


def test_refused_where_dora_cannot_apply():
    with pytest.raises(TypeError, match="use_dora must be a bool, got int"):
        lx.LoRALinear(nn.Linear(4, 4), 2, use_dora=1)
    with pytest.raises(ValueError, match="use_dora=True needs a dense weight"):
        lx.LoRALinear(lx.LowRankLinear(8, 8, 2), 2, use_dora=True)
    model = nn.Sequential(nn.Linear(8, 8), lx.LowRankLinear(8, 8, 2))
    with pytest.raises(ValueError, match="base layer 1 is a LowRankLinear"):
        lx.add_lora(model, 2, use_dora=True)
    assert type(model[0]) is nn.Linear and model[0].weight.requires_grad


def test_compiled_matches_eager():
    _, ours = _peft_pair()
    x = torch.randn(7, 12, dtype=torch.float64)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ours(x))


def test_compiled_training_through_activation_checkpointing_matches_eager():
    # At the default alpha (scale 1) inductor's partitioner failed on the
    # row norms under checkpointing ("Node ... was invalid, but is output").
    from torch.utils.checkpoint import checkpoint

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, x):
            for fc in self.fc:
                x = checkpoint(lambda h, fc=fc: h + fc(h), x, use_reentrant=False)
            return x

    torch.manual_seed(0)
    model = Blocks()
    lx.add_lora(model, rank=2, include="fc.*", use_dora=True)
    with torch.no_grad():
        for fc in model.fc:
            fc.B.normal_()
    x = torch.randn(3, 8)
    grads = []
    for run in (model, torch.compile(model)):
        run(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_a_conv1d_base_equals_peft_with_fan_in_fan_out():
    peft = pytest.importorskip("peft")
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = nn.Sequential(OrderedDict(c_attn=Conv1D(24, 12), act=nn.GELU(),
                                      c_proj=Conv1D(8, 24))).double()
    ours = copy.deepcopy(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True,
        fan_in_fan_out=True, init_lora_weights=False))
    lx.add_lora(ours, 4, 8, use_dora=True)
    _copy_adapters(peft_model, ours, ("c_attn", "c_proj"))
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = peft_model(x)
    torch.testing.assert_close(ours(x), expected)
    merged = peft_model.merge_and_unload()
    lx.merge_lora(ours)
    torch.testing.assert_close(ours.c_attn.weight, merged.c_attn.weight)
    torch.testing.assert_close(ours(x), expected)


def test_a_zero_row_gives_its_bias_not_nan_and_merges_both_ways():
    base = nn.Linear(10, 6, dtype=torch.float64)
    with torch.no_grad():
        base.weight[2] = 0  # a pruned output neuron
    original = base.weight.detach().clone()
    lora = lx.LoRALinear(base, 2, use_dora=True)  # B = 0: row 2 of W + sBA stays zero
    assert lora.magnitude[2] == 0
    x = torch.randn(4, 10, dtype=torch.float64)
    out = lora(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x @ original.T + base.bias)
    out.sum().backward()
    assert torch.isfinite(lora.magnitude.grad).all()
    lora.merge()
    torch.testing.assert_close(lora(x), out)
    lora.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=1e-12, atol=1e-12)

    with torch.no_grad():  # a trained magnitude of 0 on a live row: merge erases the row
        lora.magnitude[0] = 0
    lora.merge()
    merged = base.weight.detach().clone()
    with pytest.raises(RuntimeError, match="1 row\\(s\\) have magnitude 0"):
        lora.unmerge()
    assert lora.merged and torch.equal(base.weight, merged)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_autocast_keeps_the_products_dtype_as_peft_does(dropout):
    peft = pytest.importorskip("peft")
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 12)))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, target_modules=["fc"], use_dora=True, lora_dropout=dropout))
    ours = copy.deepcopy(model)
    lx.add_lora(ours, 4, use_dora=True, dropout=dropout)
    x = torch.randn(6, 16)
    for training in (False, True):
        theirs.train(training)
        ours.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, out = theirs(x), ours(x)
        assert out.dtype == expected.dtype == torch.bfloat16
        if not training:
            torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_fx_symbolic_trace_records_the_norms_as_one_call():
    # Tracing into the norms met `weight.dtype == torch.float64` on a Proxy
    # (a TraceError); they are constants to autograd, recorded as one call.
    lora = _dora(nn.Linear(12, 20, dtype=torch.float64)).eval()
    graph = torch.fx.symbolic_trace(lora)
    assert lora_layer.dora_row_norms in [n.target for n in graph.graph.nodes]
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(graph(x), _reference(lora, x))
