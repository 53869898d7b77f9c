"""LoRALinear against peft's own LoRA layer: same weights, same outputs, merged and unmerged."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lowrank_ext as lx

peft = pytest.importorskip("peft")


def _models(rank, alpha, dropout=0.0, init_lora_weights=False, dtype=torch.float64,
            weight=None):
    """(peft model, its LoRA layer, our LoRALinear) over copies of one nn.Linear
    (with ``weight`` as its weight when given)."""
    base = nn.Linear(24, 16, dtype=dtype)
    if weight is not None:
        with torch.no_grad():
            base.weight.copy_(weight)
    ours_base = copy.deepcopy(base)
    model = nn.Sequential(OrderedDict(fc=base))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["fc"],
                             lora_dropout=dropout, init_lora_weights=init_lora_weights)
    peft_model = peft.get_peft_model(model, config)
    peft_layer = peft_model.base_model.model.fc
    return peft_model, peft_layer, ours_base


def _copy_adapter(peft_layer, ours):
    with torch.no_grad():
        ours.A.copy_(peft_layer.lora_A["default"].weight)
        ours.B.copy_(peft_layer.lora_B["default"].weight)


@pytest.mark.parametrize("rank, alpha", [(4, 8), (3, 3), (8, 2)])
def test_outputs_equal_peft_unmerged_and_merged(rank, alpha):
    peft_model, peft_layer, ours_base = _models(rank, alpha)
    ours = lx.LoRALinear(ours_base, rank, alpha)
    _copy_adapter(peft_layer, ours)
    assert ours.scale == peft_layer.scaling["default"]
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    expected = peft_model(x)
    assert not torch.allclose(expected, ours_base(x))  # peft's random B: the adapter matters
    torch.testing.assert_close(ours(x), expected)

    peft_model.merge_adapter()
    ours.merge()
    torch.testing.assert_close(ours.base.weight, peft_layer.base_layer.weight)
    torch.testing.assert_close(ours(x), peft_model(x))

    peft_model.unmerge_adapter()
    ours.unmerge()
    torch.testing.assert_close(ours.base.weight, peft_layer.base_layer.weight)
    torch.testing.assert_close(ours(x), peft_model(x))


def test_float32_outputs_equal_peft():
    peft_model, peft_layer, ours_base = _models(4, 8, dtype=torch.float32)
    ours = lx.LoRALinear(ours_base, 4, 8)
    _copy_adapter(peft_layer, ours)
    x = torch.randn(7, 24)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-5)


def test_default_init_follows_peft():
    # Same law as peft's default: B zero, A Kaiming-uniform(a=√5) over in_features.
    peft_model, peft_layer, ours_base = _models(4, 8, init_lora_weights=True)
    ours = lx.LoRALinear(ours_base, 4, 8)
    assert torch.count_nonzero(peft_layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(ours.B) == 0
    bound = 1 / 24 ** 0.5
    assert float(ours.A.detach().abs().max()) <= bound
    assert float(peft_layer.lora_A["default"].weight.detach().abs().max()) <= bound


def _assert_same_pissa(ours, peft_model, peft_layer, factor_tol, output_tol):
    """Singular vectors have a sign freedom: compare the products, the residual
    left in the base weight, and the outputs (float32, as peft's PiSSA needs)."""
    scale = ours.scale
    peft_delta = scale * peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
    torch.testing.assert_close(scale * ours.B @ ours.A, peft_delta, **factor_tol)
    torch.testing.assert_close(ours.base.weight, peft_layer.base_layer.weight, **factor_tol)
    x = torch.randn(6, 24)
    torch.testing.assert_close(ours(x), peft_model(x), **output_tol)


def test_pissa_equals_peft():
    peft_model, peft_layer, ours_base = _models(4, 8, init_lora_weights="pissa",
                                                dtype=torch.float32)
    ours = lx.LoRALinear(ours_base, 4, 8, init="pissa")
    tol = dict(rtol=1e-4, atol=1e-5)
    _assert_same_pissa(ours, peft_model, peft_layer, tol, tol)


def test_fast_pissa_equals_peft():
    """peft's "pissa_niter_<n>" on a weight with a clear spectral gap, where any
    randomized SVD finds the same principal part."""
    torch.manual_seed(0)
    W = (torch.randn(16, 4) * 5) @ torch.randn(4, 24)
    W += 1e-3 * torch.randn(16, 24)
    peft_model, peft_layer, ours_base = _models(4, 8, init_lora_weights="pissa_niter_4",
                                                dtype=torch.float32, weight=W)
    ours = lx.LoRALinear(ours_base, 4, 8, init="pissa_niter_4")
    _assert_same_pissa(ours, peft_model, peft_layer, dict(rtol=1e-3, atol=1e-3),
                       dict(rtol=1e-4, atol=1e-4))


def test_gaussian_init_follows_peft():
    peft_model, peft_layer, ours_base = _models(4, 8, init_lora_weights="gaussian")
    ours = lx.LoRALinear(ours_base, 4, 8, init="gaussian")
    for A, B in ((ours.A, ours.B),
                 (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)):
        assert torch.count_nonzero(B) == 0
        assert 0.1 < float(A.detach().std()) < 0.4  # both N(0, (1/rank)²), rank 4


def test_dropout_in_training_equals_peft():
    peft_model, peft_layer, ours_base = _models(4, 8, dropout=0.3)
    ours = lx.LoRALinear(ours_base, 4, 8, dropout=0.3)
    _copy_adapter(peft_layer, ours)
    peft_model.train()
    ours.train()
    x = torch.randn(32, 24, dtype=torch.float64)
    torch.manual_seed(5)
    expected = peft_model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(ours(x), expected)
    peft_model.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), peft_model(x))


@pytest.mark.parametrize("bias", [True, False])
def test_weight_and_bias_attributes_as_in_peft(bias):
    base = nn.Linear(24, 16, bias=bias, dtype=torch.float64)
    model = nn.Sequential(OrderedDict(fc=copy.deepcopy(base)))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["fc"]))
    peft_layer = peft_model.base_model.model.fc
    ours = lx.LoRALinear(base, 4)
    # Both hand out the base layer's own tensors (code written for nn.Linear
    # reads them), which are not registered a second time.
    assert ours.weight is base.weight and peft_layer.weight is peft_layer.base_layer.weight
    assert ours.bias is base.bias and (ours.bias is None) == (peft_layer.bias is None)
    assert set(dict(ours.named_parameters())) == {"base.weight", "A", "B"} | (
        {"base.bias"} if bias else set())
    torch.testing.assert_close(ours.weight, peft_layer.weight, rtol=0, atol=0)
    with torch.no_grad():
        ours.B.normal_()
    ours.merge()
    torch.testing.assert_close(ours.weight, base.weight.detach(), rtol=0, atol=0)
    assert "weight" not in ours.state_dict() and "base.weight" in ours.state_dict()


class _NestedNames(nn.Module):
    """Layers whose names are dotted suffixes of others' (fc of block.fc, of
    outer.block.fc), as peft's rank_pattern / alpha_pattern keys match them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, dtype=torch.float64)
        self.block = nn.Module()
        self.block.fc = nn.Linear(8, 8, dtype=torch.float64)
        self.outer = nn.Module()
        self.outer.block = nn.Module()
        self.outer.block.fc = nn.Linear(8, 8, dtype=torch.float64)
        self.out = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x):
        return self.out(self.outer.block.fc(self.block.fc(torch.tanh(self.fc(x)))))


@pytest.mark.parametrize("odd", ["fc", "block.fc", "outer.block.fc"])
def test_a_saved_adapter_gives_each_nested_layer_its_rank_and_alpha(tmp_path, odd):
    # One layer takes another rank and alpha than the rest, which share the
    # most common ones: its rank_pattern / alpha_pattern keys must reach it alone.
    original = _NestedNames()
    model = copy.deepcopy(original)
    names = ["fc", "block.fc", "outer.block.fc", "out"]
    for name in names:
        rank, alpha = (2, 16) if name == odd else (4, 4)
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, lx.LoRALinear(getattr(holder, child), rank, alpha))
        with torch.no_grad():
            model.get_submodule(name).B.normal_()
    model.eval()
    lx.save_peft_adapter(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter").eval()
    inner = loaded.base_model.model
    for name in names:
        layer = inner.get_submodule(name)
        assert layer.r["default"] == model.get_submodule(name).rank, name
        assert layer.scaling["default"] == model.get_submodule(name).scale, name
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x))


def test_from_peft_leaves_the_random_streams_alone():
    # Converting draws nothing: the dropout masks and inits after it are those
    # a run without the conversion would draw.
    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 8), out=nn.Linear(8, 4)))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["fc", "out"]))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    lx.from_peft(peft_model)
    assert torch.equal(torch.get_rng_state(), before)
