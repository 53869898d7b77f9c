"""A merged LoRALinear's base weight holds the adapter at the scale it was
merged with: whatever would make unmerge() take out another adapter, or
leave the model computing without the adapter it reports, is refused, and
merging keeps what the user's optimizer and other layers hold."""

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import lowrank_ext as lx


def _lora(seed=0, use_dora=False, base=None):
    torch.manual_seed(seed)
    base = nn.Linear(24, 16, dtype=torch.float64) if base is None else base
    layer = lx.LoRALinear(base, 4, 8, use_dora=use_dora)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def _x():
    return torch.randn(3, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _dense_reference(layer):
    """The layer's output map in float64 from its own tensors: W + scale·B·A, bias."""
    W = layer.base.weight.detach() + layer.scale * layer.B.detach() @ layer.A.detach()
    return lambda x: x @ W.T + layer.base.bias.detach()


@pytest.mark.parametrize("use_dora", [False, True])
def test_scale_cannot_change_while_merged(use_dora):
    layer = _lora(use_dora=use_dora)
    weight = layer.base.weight.detach().clone()
    layer.merge()
    merged = layer.base.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"scale cannot change from 2 to 0.5 while the layer "
                                           r"is merged.*unmerge\(\) first"):
        layer.scale = 0.5
    assert layer.scale == 2.0 and torch.equal(layer.base.weight, merged)
    layer.scale = 2.0  # the same value changes nothing
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=1e-12)
    layer.scale = 0.5  # unmerged, as before
    assert layer.scale == 0.5


@pytest.mark.parametrize("saved_merged", [False, True])
def test_state_of_the_other_merge_state_is_refused(saved_merged):
    source = _lora()
    expected = _dense_reference(source)(_x())
    if saved_merged:
        source.merge()
    state = source.state_dict()
    target = _lora(seed=1)
    if not saved_merged:
        target.merge()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    verb = "merge" if saved_merged else "unmerge"
    with pytest.raises(RuntimeError, match=rf"saved from an? (un)?merged layer, .*{verb}\(\) it "
                                           "before loading"):
        target.load_state_dict(state)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    # As the message says: then it loads, and computes what the saved layer did.
    target.merge() if saved_merged else target.unmerge()
    target.load_state_dict(state)
    if saved_merged:
        target.unmerge()
    torch.testing.assert_close(target(_x()), expected)


def test_merged_state_round_trips_through_torch_save(tmp_path):
    """The flag travels in the state's metadata, which torch.save keeps."""
    source = _lora().merge()
    torch.save(source.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt")
    assert state._metadata[""]["lora_merged"] is True
    target = _lora(seed=1).merge()
    target.load_state_dict(state)
    torch.testing.assert_close(target(_x()), source(_x()))
    with pytest.raises(RuntimeError, match="saved from a merged layer"):
        _lora(seed=1).load_state_dict(state)


def test_state_without_metadata_loads_as_before():
    """A state from a file (safetensors keeps no metadata) is taken as it is."""
    source = _lora()
    state = dict(source.state_dict())  # a plain dict: no _metadata
    target = _lora(seed=1)
    target.load_state_dict(state)
    torch.testing.assert_close(target(_x()), source(_x()))


@pytest.mark.parametrize("keys", [("A", "B"), ("base.weight",), ("A",)])
def test_merged_layer_refuses_an_adapter_without_its_base_weight(keys):
    """peft-style ``load_state_dict(adapter, strict=False)`` into a merged layer:
    unmerge() would then take out the new adapter from a weight holding the old."""
    target = _lora().merge()
    snapshot = {k: v.clone() for k, v in target.state_dict().items()}
    other = _lora(seed=3).state_dict()
    with pytest.raises(RuntimeError, match=r"this layer is merged, so its adapter and its base "
                                           r"weight load together.*unmerge\(\) the layer"):
        target.load_state_dict({k: other[k] for k in keys}, strict=False)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in snapshot.items())
    # The bias alone does not take part in merging, and loads.
    target.load_state_dict({"base.bias": other["base.bias"]}, strict=False)
    assert torch.equal(target.base.bias, other["base.bias"])


def test_unmerged_layer_takes_an_adapter_alone_as_before():
    target = _lora()
    other = _lora(seed=3)
    target.load_state_dict({"A": other.A.detach(), "B": other.B.detach()}, strict=False)
    assert torch.equal(target.A, other.A) and torch.equal(target.B, other.B)


def _weight_normed(kind):
    torch.manual_seed(0)
    base = nn.Linear(24, 16, dtype=torch.float64)
    if kind == "parametrization":
        return parametrizations.weight_norm(base)
    if kind == "hook":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's old weight_norm
            return nn.utils.weight_norm(base)
    return parametrizations.spectral_norm(base) if kind == "spectral" else base


@pytest.mark.parametrize("kind", ["parametrization", "hook", "spectral"])
def test_merge_refuses_a_base_whose_weight_is_recomputed(kind):
    """merge() added the adapter to a weight made anew at every use: the
    layer said merged and computed without the adapter."""
    layer = _lora(base=_weight_normed(kind))
    layer.eval()
    x = _x()
    expected = layer(x).detach()
    with pytest.raises(RuntimeError, match="LoRALinear.merge: the base layer cannot take the "
                                           "adapter: its weight is"):
        layer.merge()
    assert not layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match="merge_lora: the base layer of 0 cannot take the adapter"):
        lx.merge_lora(model)
    assert model[0] is layer and not layer.merged


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_pissa_refuses_a_base_whose_weight_is_recomputed(kind):
    base = _weight_normed(kind)
    with torch.no_grad():
        x = _x()
        expected = base(x)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"init='pissa' puts the residual into the base layer's "
                                         "weight, but its weight is"):
        lx.LoRALinear(base, 4, init="pissa")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())
    torch.testing.assert_close(base(x), expected, rtol=0, atol=0)


def test_parametrized_base_still_trains_unmerged():
    layer = _lora(base=_weight_normed("parametrization"))
    x = _x()
    W = layer.base.weight.detach()
    expected = x @ (W + layer.scale * layer.B.detach() @ layer.A.detach()).T + layer.base.bias
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("base_rank", [2, 14])  # appended, and folded to rank min(d, k)
def test_lowrank_base_keeps_its_parameters_through_merge(base_rank):
    """An optimizer built before a merged evaluation still trains the model's factors."""
    torch.manual_seed(0)
    base = lx.LowRankLinear(24, 16, base_rank, dtype=torch.float64)
    base.requires_grad_(True)
    layer = lx.LoRALinear(base, 4)
    base.requires_grad_(True)  # the base's factors trained too
    A0, B0 = base.A, base.B
    values = A0.detach().clone(), B0.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rank past d·k/(d+k)
        layer.merge()
    layer.unmerge()
    assert base.A is A0 and base.B is B0
    assert torch.equal(A0, values[0]) and torch.equal(B0, values[1])
    optimizer = torch.optim.SGD([A0, B0], lr=0.1)
    layer(_x()).sum().backward()
    optimizer.step()
    assert not torch.equal(base.A, values[0])


@pytest.mark.parametrize("base_rank", [2, 14])
def test_lowrank_base_merged_state_loaded_then_unmerged_takes_the_loaded_factors(base_rank):
    def make(seed):
        torch.manual_seed(seed)
        layer = lx.LoRALinear(lx.LowRankLinear(24, 16, base_rank, dtype=torch.float64), 4)
        with torch.no_grad():
            layer.B.normal_()
        return layer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        source, target = make(0), make(1)
        own = source.base.A.detach().clone(), source.base.B.detach().clone()
        state = source.merge().state_dict()
        target.merge()
    A1 = target.__dict__["_base_parameters"][0]
    target.load_state_dict(state)
    target.unmerge()
    assert target.base.A is A1
    torch.testing.assert_close(target.base.A, own[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(target.base.B, own[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "dora", "lowrank-append", "lowrank-folded"])
@pytest.mark.parametrize("unmerge_inside", [False, True])
def test_merge_inside_inference_mode_leaves_a_trainable_layer(kind, unmerge_inside):
    torch.manual_seed(0)
    base = (lx.LowRankLinear(12, 6, 2 if kind == "lowrank-append" else 5)
            if kind.startswith("lowrank") else nn.Linear(12, 6))
    layer = lx.LoRALinear(base, 2, use_dora=kind == "dora")
    x = torch.randn(3, 12, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.inference_mode():
            layer.merge()
            layer(x.detach())
            if unmerge_inside:
                layer.unmerge()
        if not unmerge_inside:
            layer.unmerge()
    assert not any(t.is_inference() for t in list(layer.parameters()) + list(layer.buffers()))
    layer(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("kind", ["dora", "lowrank-folded"])
def test_a_layer_merged_inside_inference_mode_loads_a_state_outside(kind):
    # The tensors merge() keeps for unmerge() (DoRA's row norms, a LowRankLinear
    # base's own factors) were inference tensors: a later load_state_dict
    # failed with torch's "Inplace update to inference tensor".
    torch.manual_seed(0)
    base = lx.LowRankLinear(12, 6, 5) if kind.startswith("lowrank") else nn.Linear(12, 6)
    layer = lx.LoRALinear(base, 2, use_dora=kind == "dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.inference_mode():
            layer.merge()
    assert not any(t.is_inference() for t in list(layer.parameters()) + list(layer.buffers()))
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    x = torch.randn(3, 12)
    before = layer(x)
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    layer.unmerge()


def test_merge_lora_refuses_a_base_used_elsewhere():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8, dtype=torch.float64)
    model = nn.Module()
    model.a = lx.LoRALinear(shared, 2)
    model.b = shared  # the same layer, bare
    with torch.no_grad():
        model.a.B.normal_()
    weight = shared.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge_lora: .*the base layer of a is also at b, "
                                         "whose outputs would change too"):
        lx.merge_lora(model)
    assert isinstance(model.a, lx.LoRALinear) and not model.a.merged
    assert torch.equal(shared.weight, weight)


def test_merge_lora_refuses_two_adapters_over_one_base():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8, dtype=torch.float64)
    model = nn.Module()
    model.a, model.b = lx.LoRALinear(shared, 2), lx.LoRALinear(shared, 2)
    with pytest.raises(ValueError, match="the base layer of a is also at b.base"):
        lx.merge_lora(model)
    assert not model.a.merged and not model.b.merged


def test_merge_lora_of_a_shared_adapter_still_unwraps_every_place():
    torch.manual_seed(0)
    layer = lx.LoRALinear(nn.Linear(8, 8, dtype=torch.float64), 2)
    model = nn.Module()
    model.a = model.b = layer
    lx.merge_lora(model)
    assert model.a is model.b and type(model.a) is nn.Linear


def test_adapter_alone_from_a_merged_state_loads_into_an_unmerged_layer():
    """A and B are the same merged or not: the merged flag of their state
    concerns only the base weight, which is not loaded."""
    source = _lora().merge()
    state = source.state_dict()
    del state["base.weight"], state["base.bias"]
    assert state._metadata[""]["lora_merged"] is True
    target = _lora(seed=1)
    target.load_state_dict(state, strict=False)
    assert torch.equal(target.A, source.A) and torch.equal(target.B, source.B)


def test_a_base_with_only_its_bias_recomputed_merges():
    torch.manual_seed(0)
    base = nn.Linear(24, 16, dtype=torch.float64)
    prune.l1_unstructured(base, "bias", amount=0.5)
    layer = _lora(base=base)
    x = _x()
    expected = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    torch.testing.assert_close(layer(x), expected)


class _Halved(nn.Module):
    def forward(self, t):
        return t / 2


def test_a_lowrank_base_with_a_parametrized_bias_merges():
    torch.manual_seed(0)
    base = lx.LowRankLinear(24, 16, 3, dtype=torch.float64)
    parametrize.register_parametrization(base, "bias", _Halved())
    layer = lx.LoRALinear(base, 2)
    with torch.no_grad():
        layer.B.normal_()
    x = _x()
    expected = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("how", ["prune", "weight_norm", "parametrization"])
def test_a_lowrank_base_whose_factor_is_recomputed_is_not_merged_into(how):
    """merge() gives the base new factors: a hook recomputing A then failed at
    the next call, after merge_lora had unwrapped the layer."""
    torch.manual_seed(0)
    base = lx.LowRankLinear(24, 16, 3, dtype=torch.float64)
    if how == "prune":
        prune.l1_unstructured(base, "A", amount=0.3)
    elif how == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(base, name="A")
    else:
        parametrize.register_parametrization(base, "A", _Halved())
    layer = _lora(base=base)
    x = _x()
    expected = layer(x).detach()
    with pytest.raises(RuntimeError, match="the base layer cannot take the adapter: its A is"):
        layer.merge()
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match="the base layer of 0 cannot take the adapter: its A is"):
        lx.merge_lora(model)
    assert model[0] is layer and not layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_float16_merge_past_the_range_is_refused_before_the_weight_changes(use_dora):
    # The merged weight became inf, and unmerge() could not bring the base back.
    base = nn.Linear(2, 2, bias=False).half()
    with torch.no_grad():
        base.weight.fill_(40000.0)  # rows of norm 56569: DoRA's magnitude in range
    lora = lx.LoRALinear(base, 1, use_dora=use_dora)
    with torch.no_grad():
        lora.A.fill_(1.0)
        lora.B.fill_(30000.0)
    kept = base.weight.detach().clone()
    x = torch.full((1, 2), 1e-3, dtype=torch.float16)
    before = lora(x)
    with pytest.raises(ValueError, match=r"LoRALinear.merge: the merged weight exceeds the "
                                         r"range of float16"):
        lora.merge()
    assert not lora.merged and torch.equal(base.weight, kept)
    torch.testing.assert_close(lora(x), before, rtol=0, atol=0, equal_nan=True)


def test_merging_inside_disable_lora_is_refused():
    # The merged weight held the adapter, so the block's base outputs did too.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lx.add_lora(model, 2)
    with torch.no_grad():
        model[0].B.normal_()
    x = torch.randn(3, 4)
    with lx.disable_lora(model):
        base_outputs = model(x)
        with pytest.raises(RuntimeError, match=r"LoRALinear.merge: the adapter is disabled "
                                               r"\(inside lx.disable_lora\)"):
            model[0].merge()
        with pytest.raises(ValueError, match=r"merge_lora: the adapters of 0, 1 are "
                                             r"disabled \(inside lx.disable_lora\)"):
            lx.merge_lora(model)
        torch.testing.assert_close(model(x), base_outputs)
    lx.merge_lora(model)


@pytest.mark.parametrize("kind", ["dense", "dora", "lowrank"])
def test_a_merged_layer_loads_a_state_of_its_bias_alone(kind):
    # DoRA and refolded layers asked for the tensors merge() keeps even where
    # the state held only the bias ("the bias loads either way").
    base = lx.LowRankLinear(8, 6, 5) if kind == "lowrank" else nn.Linear(8, 6)
    lora = lx.LoRALinear(base, 2, use_dora=kind == "dora").merge()
    bias = torch.full((6,), 0.5)
    lora.load_state_dict({"base.bias": bias}, strict=False)
    assert torch.equal(lora.base.bias, bias)
    nn.Sequential(lora).load_state_dict({"0.base.bias": -bias}, strict=False)
    assert torch.equal(lora.base.bias, -bias)


@pytest.mark.parametrize("name", ["A", "B"])
def test_a_merged_layer_with_a_parametrized_factor_loads_its_own_state(name):
    # The state holds parametrizations.A.original, not A: the merged layer's
    # all-or-nothing check said the state held B and base.weight without A.
    class Half(nn.Module):
        def forward(self, X):
            return X * 0.5

    torch.manual_seed(0)
    layer = lx.LoRALinear(nn.Linear(6, 4, dtype=torch.float64), rank=2)
    with torch.no_grad():
        layer.B.normal_()
    parametrize.register_parametrization(layer, name, Half())
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = layer(x)
    other = copy.deepcopy(layer)
    layer.merge()
    other.merge()
    with torch.no_grad():
        other.base.weight.zero_()
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), expected)
    other.unmerge()
    torch.testing.assert_close(other(x), expected)
    # Still all or nothing: the state without its factor is refused.
    other.merge()
    state = {key: value for key, value in layer.state_dict().items()
             if key != f"parametrizations.{name}.original"}
    with pytest.raises(RuntimeError, match=f"without parametrizations.{name}.original"):
        other.load_state_dict(state, strict=False)


def _everything(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_as_before(model, before):
    types, state, flags = _everything(model)
    assert types == before[0] and flags == before[2]
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


@pytest.mark.parametrize("why", ["held outside the tree", "merged rank past break-even"])
def test_merge_lora_warns_before_the_first_merge(why):
    # Under warnings-as-errors a warning given after the first layer merged
    # left its weight off by the rounding of W + ΔW − ΔW.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64),
                          lx.LowRankLinear(64, 64, 30 if why.startswith("merged") else 4))
    lx.add_lora(model, 8)
    with torch.no_grad():
        for layer in model:
            layer.B.normal_()
    if why.startswith("held"):
        model.order = [model[1]]  # a plain list: the swap warns
    before = _everything(model)
    x = torch.randn(3, 64)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            lx.merge_lora(model)
    _assert_as_before(model, before)
    with pytest.warns(UserWarning):
        assert lx.merge_lora(model) == ["0", "1"]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("action", ["add_lora", "from_peft"])
def test_a_failed_call_gives_an_encoder_its_nested_tensor_flag_back(action):
    # The swaps were undone, but the encoder's use_nested_tensor stayed False
    # (outputs at padded positions then differ from the nested path's zeros).
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        encoder=nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                                      2),
        head=nn.Linear(16, 4)))
    model.eval()
    if action == "from_peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=2, target_modules=["linear1", "linear2", "head"])).base_model.model
        convert = lx.from_peft
    else:
        convert = lambda model: lx.add_lora(model, 2)  # noqa: E731
    encoder = model.encoder
    assert encoder.use_nested_tensor is True
    model.keep = [model.head]  # a plain list: the swap of the head warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="also held in keep"):
            convert(model)
    assert encoder.use_nested_tensor is True


def test_a_flag_set_again_stays_when_a_later_call_swaps_nothing_below_it():
    # The encoder already held adapters, and the user switched nested tensors
    # back on (such layers run on each sequence); add_lora on the head alone
    # switched them off again.
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        encoder=nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                                      2),
        head=nn.Linear(16, 4)))
    lx.add_lora(model, 2, include="linear1")
    assert model.encoder.use_nested_tensor is False  # a layer swapped in below it
    model.encoder.use_nested_tensor = True
    lx.add_lora(model, 2, include="head")
    assert model.encoder.use_nested_tensor is True
    lx.add_lora(model, 2, include="linear2")
    assert model.encoder.use_nested_tensor is False


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_lora_refuses_a_merged_weight_past_float16_before_merging_any(use_dora):
    # The second layer's refusal came after the first had merged, whose
    # unmerge then left its weight off by float16 rounding.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half()
    lx.add_lora(model, 4, use_dora=use_dora)
    with torch.no_grad():
        model[0].B.normal_()
        model[0].A.normal_()
        model[1].B.fill_(200.0)  # 4 · 200 · 200 = 160000: past float16's 65504
        model[1].A.fill_(200.0)
    before = _everything(model)
    with pytest.raises(ValueError, match="merge_lora: layer '1': the merged weight exceeds the "
                                         "range of float16.*nothing was merged"):
        lx.merge_lora(model)
    _assert_as_before(model, before)
    assert not model[0].merged and not model[1].merged


@pytest.mark.parametrize("use_dora", [False, True])
def test_an_inference_tensor_base_weight_is_refused_before_anything_changes(use_dora):
    # torch's in-place write to an inference tensor outside inference mode
    # changes it, then raises: the merge left the weight merged and the flag
    # unset (the adapter then counted twice), and unmerge the reverse.
    torch.manual_seed(0)
    with torch.inference_mode():
        base = nn.Linear(16, 8)
    lora = lx.LoRALinear(base, 4, use_dora=use_dora)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(3, 16)
    before, weight = lora(x).detach(), base.weight.clone()
    with pytest.raises(RuntimeError, match="its weight is an inference tensor"):
        lora.merge()
    assert not lora.merged and torch.equal(base.weight, weight)
    torch.testing.assert_close(lora(x), before, rtol=0, atol=0)
    model = nn.Sequential(lora)
    with pytest.raises(ValueError, match="merge_lora: the base layer of 0 cannot take the "
                                         "adapter: its weight is an inference tensor"):
        lx.merge_lora(model)
    assert model[0] is lora and torch.equal(base.weight, weight)
    # Merged inside inference mode, it is unmerged there too.
    with torch.inference_mode():
        lora.merge()
    merged = base.weight.clone()
    with pytest.raises(RuntimeError, match="LoRALinear.unmerge: .*inference tensor.*left merged"):
        lora.unmerge()
    assert lora.merged and torch.equal(base.weight, merged)
    with torch.inference_mode():
        lora.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=1e-6, atol=1e-6)


def test_what_merge_keeps_for_unmerge_does_not_load_alone():
    # A state of a merged DoRA layer's _dora_norms alone loaded, and unmerge()
    # then restored another weight.
    torch.manual_seed(0)
    lora = lx.LoRALinear(nn.Linear(16, 8), 4, use_dora=True)
    with torch.no_grad():
        lora.B.normal_()
    weight = lora.base.weight.clone()
    lora.merge()
    norms = lora._dora_norms.clone()
    with pytest.raises(RuntimeError, match="holds _dora_norms without the base weight"):
        lora.load_state_dict({"_dora_norms": 2 * norms}, strict=False)
    assert torch.equal(lora._dora_norms, norms)
    lora.unmerge()
    torch.testing.assert_close(lora.base.weight, weight, rtol=1e-6, atol=1e-6)


def test_a_recomputed_weight_left_an_inference_tensor_is_refused_for_its_hook():
    # weight_norm's hook leaves an inference tensor after a call under
    # inference_mode: the refusal named that, and its advice (merge inside the
    # mode, or clone the weight) cannot help while the hook recomputes it.
    base = _weight_normed("hook")
    lora = lx.LoRALinear(base, 4)
    with torch.inference_mode():
        lora(torch.randn(2, 24, dtype=torch.float64))
    assert base.weight.is_inference()
    with pytest.raises(RuntimeError, match="set anew before every call by torch's WeightNorm"):
        lora.merge()
