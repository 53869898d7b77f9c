"""LoRALinear through a module's life outside plain training: built on the meta
device and reset, hooked, quantized, saved and loaded while merged."""

import copy
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lowrank_ext as lx


def _reference(x, W, bias, A, B, scale):
    """x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ in float64."""
    x, W, A, B = x.double(), W.double(), A.double(), B.double()
    out = x @ W.T + scale * (x @ A.T) @ B.T
    return out if bias is None else out + bias.double()


def _dora_reference(x, W, bias, A, B, magnitude, scale):
    """magnitude / ‖W + scale·B·A‖ ⊙ x·(W + scale·B·A)ᵀ + bias in float64."""
    merged = W.double() + scale * B.double() @ A.double()
    factor = magnitude.double() / torch.linalg.vector_norm(merged, dim=1)
    out = factor * (x.double() @ merged.T)
    return out if bias is None else out + bias.double()


def _trained(base, seed=0, **kwargs):
    """A LoRALinear over ``base`` whose adapter moved off its start."""
    torch.manual_seed(seed)
    lora = lx.LoRALinear(base, 3, alpha=6.0, **kwargs)
    with torch.no_grad():
        lora.B.normal_()
        if lora.use_dora:
            lora.magnitude.mul_(torch.rand_like(lora.magnitude) + 0.5)
    return lora


# --- reset_parameters: meta-device initialisation ------------------------------------
def _on_meta_then_reset(make, order=lambda model: model.modules()):
    with torch.device("meta"):
        model = make()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for module in order(model):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_a_layer_built_on_meta_resets_to_its_init_and_starts_equal_to_its_base(init):
    # torchtitan's recipe: to_empty, then every module's reset_parameters,
    # parents first (the base resets itself after its LoRALinear).
    model = _on_meta_then_reset(lambda: nn.Sequential(
        lx.LoRALinear(nn.Linear(64, 48, dtype=torch.float64), 8, init=init),
        lx.LowRankLinear(48, 32, 4, dtype=torch.float64)))
    lora = model[0]
    assert lora.init == init
    assert torch.count_nonzero(lora.B) == 0
    if init == "default":  # Kaiming-uniform with a=√5: U(±1/√in_features), as nn.Linear
        bound = 1 / math.sqrt(64)
        assert lora.A.abs().max() <= bound and lora.A.std() > 0.9 * bound / math.sqrt(3)
    else:  # N(0, 1/rank²)
        assert abs(float(lora.A.detach().std()) - 1 / 8) < 0.02
    x = torch.randn(5, 64, dtype=torch.float64)
    W, b = lora.base.weight, lora.base.bias
    assert torch.isfinite(W).all()
    torch.testing.assert_close(lora(x), x @ W.T + b)
    torch.testing.assert_close(model(x), model[1](x @ W.T + b))


def test_fsdp1_meta_materialization_resets_the_layer():
    # FSDP1 calls module.reset_parameters() on every module owning tensors,
    # each materialized alone: the LoRALinear before its base.
    init_utils = pytest.importorskip("torch.distributed.fsdp._init_utils")
    materialize = getattr(init_utils, "_materialize_meta_module", None)
    if materialize is None:
        pytest.skip("this torch has no FSDP1 meta materialization")
    with torch.device("meta"):
        model = nn.Sequential(lx.LoRALinear(nn.Linear(16, 12), 4))
    materialize(model, torch.device("cpu"), set(), None)
    lora = model[0]
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.count_nonzero(lora.B) == 0
    x = torch.randn(3, 16)
    torch.testing.assert_close(lora(x).double(), _reference(x, lora.base.weight, lora.base.bias,
                                                           lora.A, lora.B, lora.scale))


def test_reset_parameters_leaves_the_base_alone_and_starts_over():
    lora = _trained(nn.Linear(10, 6, dtype=torch.float64))
    base = {k: v.clone() for k, v in lora.base.state_dict().items()}
    lora.reset_parameters()
    assert all(torch.equal(v, base[k]) for k, v in lora.base.state_dict().items())
    assert torch.count_nonzero(lora.B) == 0 and lora.A.requires_grad and lora.B.requires_grad
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(lora(x), x @ base["weight"].T + base["bias"])


def test_layers_pickled_before_the_init_was_kept_reset_as_peft_defaults():
    lora = _trained(nn.Linear(10, 6))
    del lora.init  # as unpickled from before: the class default
    assert lora.init == "default"
    lora.reset_parameters()
    assert torch.count_nonzero(lora.B) == 0 and lora.A.abs().max() <= 1 / math.sqrt(10)


def test_models_pickled_when_lora_linear_lived_in_lowrank_ext_nn_still_load():
    # torch.save(model) records each class by module and name; LoRALinear's
    # moved from lowrank_ext.nn to lowrank_ext.lora_layer.
    import io
    import pickle

    model = nn.Sequential(lx.LoRALinear(nn.Linear(5, 3), 2))
    buffer = io.BytesIO()
    torch.save(model, buffer)

    class OldPlaces(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("lowrank_ext.lora_layer", "LoRALinear"):
                module = "lowrank_ext.nn"
            return super().find_class(module, name)

    buffer.seek(0)
    old = torch.load(buffer, weights_only=False,
                     pickle_module=type("old_pickle", (), {"Unpickler": OldPlaces,
                                                           "load": pickle.load}))
    x = torch.randn(2, 5)
    assert type(old[0]) is lx.LoRALinear
    torch.testing.assert_close(old(x), model(x), rtol=0, atol=0)


def test_dora_magnitude_resets_to_the_norms_of_the_base_as_it_is():
    def make():
        return nn.Sequential(lx.LoRALinear(nn.Linear(12, 7, dtype=torch.float64), 3,
                                           use_dora=True))
    # Children first: the base holds its values when the magnitude is read.
    model = _on_meta_then_reset(make, order=lambda model: reversed(list(model.modules())))
    lora = model[0]
    W, b = lora.base.weight, lora.base.bias
    torch.testing.assert_close(lora.magnitude, torch.linalg.vector_norm(W, dim=1))
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(lora(x), x @ W.T + b)
    # Parents first (model.modules()), then the DoRA layers once more, as documented.
    model = _on_meta_then_reset(make)
    model[0].reset_parameters()
    W, b = model[0].base.weight, model[0].base.bias
    torch.testing.assert_close(model(x), x @ W.T + b)


def test_reset_parameters_refuses_what_it_cannot_redo():
    # DoRA over a base still on meta (FSDP1's parents-first materialization).
    with torch.device("meta"):
        lora = lx.LoRALinear(nn.Linear(12, 7), 3, use_dora=True)
    lora.to_empty(device="cpu", recurse=False)
    with pytest.raises(RuntimeError, match=r"magnitude.*base.weight.*still on the meta device"):
        lora.reset_parameters()
    # PiSSA took the principal part out of the base weight.
    base = nn.Linear(12, 7)
    lora = lx.LoRALinear(base, 3, init="pissa")
    A = lora.A.detach().clone()
    with pytest.raises(RuntimeError, match=r"init='pissa'.*cannot be redone"):
        lora.reset_parameters()
    assert torch.equal(lora.A, A)
    # A merged layer's base holds the adapter.
    lora = _trained(nn.Linear(12, 7)).merge()
    A = lora.A.detach().clone()
    with pytest.raises(RuntimeError, match=r"merged.*unmerge\(\) it first"):
        lora.reset_parameters()
    assert torch.equal(lora.A, A)


# --- hooks on the base layer ----------------------------------------------------------
def _peft_layer(lora):
    """peft's LoRA layer over a copy of ``lora``'s base, with its A, B (and magnitude)."""
    peft = pytest.importorskip("peft")
    model = nn.Sequential(OrderedDict(fc=copy.deepcopy(lora.base)))
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=["fc"],
                             use_dora=lora.use_dora)
    peft_model = peft.get_peft_model(model, config)
    layer = peft_model.base_model.model.fc
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora.A)
        layer.lora_B["default"].weight.copy_(lora.B)
        if lora.use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(lora.magnitude)
    return peft_model, layer


@pytest.mark.parametrize("use_dora", [False, True])
def test_forward_hooks_on_the_base_run_as_in_peft(use_dora):
    lora = _trained(nn.Linear(12, 7, dtype=torch.float64), use_dora=use_dora)
    peft_model, peft_layer = _peft_layer(lora)
    x = torch.randn(4, 12, dtype=torch.float64)
    W, b = lora.base.weight, lora.base.bias
    expected = (_dora_reference(x, W, b, lora.A, lora.B, lora.magnitude, lora.scale)
                if use_dora else _reference(x, W, b, lora.A, lora.B, lora.scale))
    seen, theirs = [], []
    lora.base.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    lora.base.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    peft_layer.base_layer.register_forward_hook(lambda module, args, out: theirs.append(out))
    y = lora(x)
    assert seen[0] == "pre" and len(seen) == 2 and len(theirs) == 0
    peft_y = peft_model(x)
    assert len(theirs) == 1
    torch.testing.assert_close(seen[1], x @ W.T + b)  # what the base itself gives
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, peft_y)


def test_a_hook_that_changes_the_base_output_changes_the_layers_as_in_peft():
    lora = _trained(nn.Linear(12, 7, dtype=torch.float64))
    peft_model, peft_layer = _peft_layer(lora)
    for layer in (lora.base, peft_layer.base_layer):
        layer.register_forward_pre_hook(lambda module, args: (2 * args[0],))
        layer.register_forward_hook(lambda module, args, out: out + 1)
    x = torch.randn(4, 12, dtype=torch.float64)
    W, b = lora.base.weight, lora.base.bias
    expected = (2 * x) @ W.T + b + 1 + _reference(x, torch.zeros_like(W), None, lora.A, lora.B,
                                                  lora.scale)
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora(x), peft_model(x))
    # Gradients reach the adapter through that path too.
    lora(x).sum().backward()
    assert lora.A.grad is not None and lora.B.grad is not None


def test_global_module_hooks_and_an_instance_forward_reach_the_base():
    lora = _trained(nn.Linear(12, 7, dtype=torch.float64))
    x = torch.randn(4, 12, dtype=torch.float64)
    W, b = lora.base.weight, lora.base.bias
    adapter = _reference(x, torch.zeros_like(W), None, lora.A, lora.B, lora.scale)
    called = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: called.append(module))
    try:
        y = lora(x)
    finally:
        handle.remove()
    assert any(module is lora.base for module in called)
    torch.testing.assert_close(y, x @ W.T + b + adapter)
    # accelerate's hooks replace the layer's forward on the instance.
    plain_forward = lora.base.forward
    lora.base.forward = lambda inputs: 3 * plain_forward(inputs)
    torch.testing.assert_close(lora(x), 3 * (x @ W.T + b) + adapter)


# --- a quantized base -----------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_base_quantize_dynamic_replaced_is_named_not_hidden():
    if not torch.backends.quantized.supported_engines or \
            torch.backends.quantized.supported_engines == ["none"]:
        pytest.skip("no quantized engine")
    model = nn.Sequential(lx.LoRALinear(nn.Linear(8, 6), 2), lx.LowRankLinear(6, 4, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model)
    lora = quantized[0]
    assert type(lora.base) is not nn.Linear and not isinstance(lora.base.weight, torch.Tensor)
    assert (lora.in_features, lora.out_features) == (8, 6)
    assert "in_features=8, out_features=6, rank=2" in repr(quantized)
    with pytest.raises(TypeError, match=r"LoRALinear: the base layer was replaced by "
                                        r"torch\.ao\..*Linear, whose weight is a method, not a "
                                        r"Tensor; LoRALinear needs its dense weight"):
        quantized(torch.randn(3, 8))


# --- a merged layer's state -----------------------------------------------------------
def _dora():
    return _trained(nn.Linear(8, 6, dtype=torch.float64), use_dora=True)


def _over_lowrank():
    # Rank 4 + 4 > min(12, 6): merging refolds the factors at rank 6.
    torch.manual_seed(0)
    return _trained(lx.LowRankLinear(12, 6, rank=4, dtype=torch.float64))


def _base_tensors(lora):
    return {k: v.detach().clone() for k, v in lora.base.state_dict().items()}


@pytest.mark.parametrize("make, kept", [(_dora, ["_dora_norms"]),
                                        (_over_lowrank, ["_base_A", "_base_B"])])
def test_a_merged_state_loads_into_a_merged_layer_and_unmerges_there(make, kept):
    src, dst = make(), make()
    with torch.no_grad():  # another trained state in dst
        for p in [dst.B, *dst.base.parameters()]:
            p.add_(torch.randn_like(p))
    unmerged_keys = set(src.state_dict())
    assert not set(kept) & unmerged_keys  # unmerged states keep their keys
    k = src.in_features
    x = torch.randn(3, k, dtype=torch.float64)
    src_base, expected = _base_tensors(src), src(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a merged rank past d·k/(d+k) warns
        src.merge()
        dst.merge()
    state = src.state_dict()
    assert set(state) == unmerged_keys | set(kept)
    dst.load_state_dict(state)
    torch.testing.assert_close(dst(x), src(x))
    dst.unmerge()
    assert set(dst.state_dict()) == unmerged_keys
    for key, value in _base_tensors(dst).items():
        torch.testing.assert_close(value, src_base[key])
    torch.testing.assert_close(dst(x), expected)


@pytest.mark.parametrize("base_rank", [3, 5])  # the adapter's ranks appended; refolded
@pytest.mark.parametrize("materialize", ["assign", "to_empty"])
def test_a_layer_built_on_meta_and_loaded_while_merged_unmerges(base_rank, materialize):
    # merge() keeps the base's factor Parameters for unmerge(); built on meta,
    # those stayed meta when the layer was materialized, and unmerge() failed
    # in torch's words with the layer half changed.
    def make():
        torch.manual_seed(0)
        return _trained(lx.LowRankLinear(8, 6, rank=base_rank, dtype=torch.float64))

    src = make()
    x = torch.randn(4, 8, dtype=torch.float64)
    expected, base = src(x).detach(), _base_tensors(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a merged rank past d·k/(d+k) warns
        src.merge()
        with torch.device("meta"):
            dst = make()
        dst.merge()
    if materialize == "assign":
        dst.load_state_dict(src.state_dict(), assign=True)
    else:
        dst.to_empty(device="cpu")
        dst.load_state_dict(src.state_dict())
    dst.unmerge()
    assert not dst.merged and dst.base.A.device.type == "cpu"
    for key, value in _base_tensors(dst).items():
        torch.testing.assert_close(value, base[key], rtol=0, atol=0)
    torch.testing.assert_close(dst(x), expected)


@pytest.mark.parametrize("strict", [True, False])
def test_merged_states_that_would_unmerge_wrongly_are_refused(strict):
    src, dst = _dora(), _dora()
    src.merge()
    state = src.state_dict()
    # A merged state into a layer that is not merged.
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"the state was saved from a merged layer, but this "
                                           r"layer is not merged"):
        dst.load_state_dict(state, strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    # Without the state's metadata (a state read from a file), by what it holds.
    with pytest.raises(RuntimeError, match=r"holds _dora_norms, which only a merged layer's "
                                           r"state holds, but this layer is not merged"):
        dst.load_state_dict(dict(state), strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    # A merged state without what unmerge needs (saved by an older version).
    dst.merge()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    old = {k: v for k, v in state.items() if k != "_dora_norms"}
    with pytest.raises(RuntimeError, match=r"unmerge\(\) needs _dora_norms from the state, "
                                           r"which holds none of them"):
        dst.load_state_dict(old, strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    # Inside a model, the message names the layer.
    model = nn.Sequential(OrderedDict(fc=dst))
    with pytest.raises(RuntimeError, match=r"LoRALinear 'fc': this merged layer's unmerge"):
        model.load_state_dict({f"fc.{k}": v for k, v in old.items()}, strict=strict)


def test_a_state_without_the_layer_leaves_a_merged_layer_loadable_partly():
    # strict=False loads of other modules' tensors do not concern the layer.
    model = nn.Sequential(OrderedDict(fc=_dora().merge(), out=nn.Linear(6, 2,
                                                                        dtype=torch.float64)))
    other = nn.Linear(6, 2, dtype=torch.float64)
    result = model.load_state_dict({f"out.{k}": v for k, v in other.state_dict().items()},
                                   strict=False)
    assert "fc._dora_norms" not in result.missing_keys
    torch.testing.assert_close(model.out.weight, other.weight)
    assert model.fc.merged


def test_assign_loads_the_kept_tensors_too():
    src = _dora().merge()
    with torch.device("meta"):
        dst = lx.LoRALinear(nn.Linear(8, 6, dtype=torch.float64), 3, alpha=6.0, use_dora=True)
    dst.merge()
    dst.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, assign=True)
    assert not any(t.is_meta for t in dst.state_dict().values())
    torch.testing.assert_close(dst.unmerge().base.weight, src.unmerge().base.weight)
