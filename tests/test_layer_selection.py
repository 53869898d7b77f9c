"""Which layers compress_model and add_lora take: layers left alone (nn.Linear
subclasses, parametrized layers) and layers registered under several names."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import lowrank_ext as lx

PARAMETRIZE = {
    "weight_norm": (parametrizations.weight_norm, "_WeightNorm"),
    "spectral_norm": (parametrizations.spectral_norm, "_SpectralNorm"),
    "orthogonal": (parametrizations.orthogonal, "_Orthogonal"),
}


def _parametrized(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(16, 8, dtype=torch.float64))
    PARAMETRIZE[kind][0](model[0])
    return model.train()  # spectral_norm steps its power iteration at each use in training


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())


class Doubled(nn.Linear):
    """A subclass computing otherwise than its weight says."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("kind", PARAMETRIZE)
def test_a_parametrized_linear_is_left_alone_with_a_note(kind):
    model = _parametrized(kind)
    layer, state = model[0], _state(model)
    report = lx.compress_model(model, rank=4, progress=False)
    assert model[0] is layer and isinstance(model[2], lx.LowRankLinear)
    # The report never computed the weight: spectral_norm's u and v did not move.
    _assert_state(model[0], {k[2:]: v for k, v in state.items() if k.startswith("0.")})
    rows = {row.name: row for row in report.layers}
    assert list(rows) == ["0", "2"]
    assert rows["0"].rank is None and rows["0"].shape == (16, 16)
    assert rows["0"].params_before == rows["0"].params_after == 16 * 16
    assert report.params_before == 16 * 16 + 8 * 16
    note = rows["0"].note
    assert note.startswith("dense: left alone, a parametrized nn.Linear")
    assert f"weight: {PARAMETRIZE[kind][1]}" in note and "remove_parametrizations" in note
    assert "0: dense: left alone" in str(report)
    # Left out by exclude, it leaves the report.
    report = lx.compress_model(_parametrized(kind), rank=4, exclude="0", progress=False)
    assert [row.name for row in report.layers] == ["2"]


@pytest.mark.parametrize("kind", PARAMETRIZE)
def test_including_only_a_parametrized_linear_says_why_it_is_left_alone(kind):
    model = _parametrized(kind)
    state = _state(model)
    message = (r"include pattern '0' matches only layers left alone: 0 \(a parametrized "
               r"nn.Linear \(weight: " + PARAMETRIZE[kind][1])
    with pytest.raises(TypeError, match="compress_model: " + message):
        lx.compress_model(model, rank=4, include="0")
    with pytest.raises(TypeError, match="add_lora: " + message):
        lx.add_lora(model, 2, include="0")
    _assert_state(model, state)
    assert type(model[2]) is nn.Linear
    # Without include, add_lora wraps the rest and leaves it as it was.
    assert lx.add_lora(model, 2) == ["2"]
    assert type(model[0]).__name__ == "ParametrizedLinear"


def test_a_linear_subclass_is_left_alone_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(Doubled(8, 8), nn.Linear(8, 8))
    x = torch.randn(3, 8)
    expected = model[0](x)
    report = lx.compress_model(model, rank=2)
    assert type(model[0]) is Doubled
    torch.testing.assert_close(model[0](x), expected, rtol=0, atol=0)
    row = report.layers[0]
    assert row.name == "0" and row.rank is None
    assert row.note.startswith("dense: left alone, Doubled, a subclass of nn.Linear: its "
                               "forward")
    for call in (lambda: lx.compress_model(nn.Sequential(Doubled(8, 8), nn.Linear(8, 8)),
                                           rank=2, include="0"),
                 lambda: lx.add_lora(nn.Sequential(Doubled(8, 8), nn.Linear(8, 8)), 2,
                                     include="0")):
        with pytest.raises(TypeError, match=r"matches only layers left alone: 0 \(Doubled, a "
                                            r"subclass of nn.Linear"):
            call()


def test_the_out_proj_of_packed_attention_points_to_split_attention():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 1,
                                  enable_nested_tensor=False)
    with pytest.warns(UserWarning, match="packed"):
        report = lx.compress_model(model, rank=2)
    rows = {row.name: row for row in report.layers}
    assert "reads its weight directly; lx.split_attention(model)" in \
        rows["layers.0.self_attn.out_proj"].note
    with pytest.raises(TypeError, match="'out_proj' matches only layers left alone"):
        lx.add_lora(model, 2, include="out_proj")


def test_only_layers_left_alone_is_no_selection():
    model = nn.Sequential(Doubled(8, 8))
    with pytest.raises(ValueError, match=r"compress_model: the model has no nn.Linear \(or "
                                         r"Conv1D\) layer \(left alone: 0 \(Doubled"):
        lx.compress_model(model, rank=2)
    with pytest.raises(ValueError, match=r"add_lora: the model has no nn.Linear, Conv1D or "
                                         r"LowRankLinear layer to wrap \(left alone: 0"):
        lx.add_lora(model, 2)
    model = nn.Sequential(Doubled(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"leave no layer selected \(only layers left alone: "
                                         r"0 \(Doubled"):
        lx.compress_model(model, rank=2, include="*", exclude="1")
    assert type(model[1]) is nn.Linear


def test_a_weight_shared_with_a_layer_left_alone_counts_once():
    model = nn.Module()
    model.a = nn.Linear(8, 8)
    model.b = Doubled(8, 8)
    model.b.weight = model.a.weight
    model.c = nn.Linear(8, 8)
    report = lx.compress_model(model, rank=2)
    rows = {row.name: row for row in report.layers}
    assert list(rows) == ["a", "b", "c"]
    assert "tied to b.weight" in rows["a"].note
    assert "left alone" in rows["b"].note and "counted at a" in rows["b"].note
    assert report.params_before == model.a.weight.numel() + model.c.weight.numel()


class Shared(nn.Module):
    """One Linear under two names, and a block (holding a Linear) used twice."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8, dtype=torch.float64)
        self.dec = self.enc
        self.other = nn.Linear(8, 8, dtype=torch.float64)
        block = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), nn.Tanh())
        self.blocks = nn.Sequential(block, block)


def test_a_shared_layer_is_selected_by_any_of_its_names():
    model = Shared()
    assert lx.add_lora(model, 2, include="dec") == ["enc"]
    assert isinstance(model.enc, lx.LoRALinear) and model.dec is model.enc
    assert type(model.other) is nn.Linear and type(model.blocks[0][0]) is nn.Linear

    model = Shared()
    assert lx.add_lora(model, 2, include="blocks.1.0") == ["blocks.0.0"]
    assert isinstance(model.blocks[1][0], lx.LoRALinear)
    assert model.blocks[0][0] is model.blocks[1][0]

    # compress_model selects it too, and keeps it dense in both places.
    model = Shared()
    report = lx.compress_model(model, rank=2, include="dec")
    [row] = report.layers
    assert row.name == "enc" and row.rank is None and "also at dec" in row.note
    assert type(model.enc) is nn.Linear and model.dec is model.enc


def test_a_shared_layer_is_excluded_by_any_of_its_names():
    model = Shared()
    assert lx.add_lora(model, 2, exclude=["dec", "blocks.1.*"]) == ["other"]
    assert type(model.enc) is nn.Linear and model.dec is model.enc
    assert type(model.blocks[0][0]) is nn.Linear
    model = Shared()
    report = lx.compress_model(model, rank=2, exclude=["dec", "blocks.1.0"])
    assert [row.name for row in report.layers] == ["other"]
    assert type(model.enc) is nn.Linear and type(model.blocks[0][0]) is nn.Linear


def test_an_unmatched_pattern_lists_every_name_of_a_shared_layer():
    with pytest.raises(ValueError, match=r"'nope' matches no nn.Linear, Conv1D or LowRankLinear "
                                         r"layer \(candidates: enc, dec, other, blocks.0.0, "
                                         r"blocks.1.0\)"):
        lx.add_lora(Shared(), 2, include="nope")
    with pytest.raises(ValueError, match=r"exclude pattern 'nope' matches no layer "
                                         r"\(candidates: enc, dec, other"):
        lx.compress_model(Shared(), rank=2, exclude="nope")
