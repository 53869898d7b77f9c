"""Plain nn.Linear layers that a LowRankLinear (or a LoRALinear) in their
place would not stand for: a forward set on the instance (accelerate's
hooks), state besides the weight and bias, a weight sharing its storage with
another tensor; and include/exclude patterns equal to names holding glob
characters."""

import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx


def _rank4(*layers):
    """Give each layer an exactly rank-4 weight: rank-4 factors are lossless."""
    with torch.no_grad():
        for layer in layers:
            d, k = layer.weight.shape
            layer.weight.copy_(torch.randn(d, 4, dtype=layer.weight.dtype)
                               @ torch.randn(4, k, dtype=layer.weight.dtype))


def _truncated(weight, rank):
    """The best rank-``rank`` approximation of ``weight``, in float64."""
    U, S, Vh = torch.linalg.svd(weight.detach().double())
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


def _scaled_by_ten(layer):
    """Set a forward on ``layer`` alone that scales its output by 10."""
    original = layer.forward
    layer.forward = lambda x: original(x) * 10.0
    return layer


def _note(report, name):
    return next(layer.note for layer in report.layers if layer.name == name)


# --- 1. a forward set on the instance ------------------------------------------------
def test_compress_model_leaves_a_layer_with_an_instance_forward_alone():
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(16, 16, dtype=torch.float64))
    _rank4(model[0], model[2])
    hooked = _scaled_by_ten(model[2])
    x = torch.randn(4, 16, dtype=torch.float64)
    W0, b0, W2, b2 = (t.detach().clone() for t in (model[0].weight, model[0].bias,
                                                    model[2].weight, model[2].bias))
    report = lx.compress_model(model, rank=4, progress=False)
    assert model[2] is hooked and type(model[2]) is nn.Linear
    assert isinstance(model[0], lx.LowRankLinear)
    assert "forward set on the instance" in _note(report, "2")
    # The layer's own forward still runs: ten times the Linear's output.
    expected = (torch.relu(x @ W0.T + b0) @ W2.T + b2) * 10.0
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_an_include_naming_only_a_layer_with_an_instance_forward_is_refused():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    _scaled_by_ten(model[2])
    state = _state(model)
    with pytest.raises(TypeError, match="matches only layers left alone: 2 .*forward set on "
                                        "the instance"):
        lx.compress_model(model, rank=2, include="2", progress=False)
    with pytest.raises(TypeError, match="matches only layers left alone: 2 .*forward set on "
                                        "the instance"):
        lx.add_lora(model, 2, include="2")
    assert all(type(model[i]) is nn.Linear for i in (0, 2))
    _assert_same_state(model, state)


def test_accelerate_hooks_are_kept_and_removing_them_lets_the_layer_compress():
    hooks = pytest.importorskip("accelerate.hooks")

    class Scale(hooks.ModelHook):
        def post_forward(self, module, output):
            return output * 10.0

    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64))
    _rank4(model[0])
    hooks.add_hook_to_module(model[0], Scale())
    x = torch.randn(4, 16, dtype=torch.float64)
    expected = (x @ model[0].weight.detach().T + model[0].bias.detach()) * 10.0
    with pytest.raises(ValueError, match="no nn.Linear .*left alone: 0 .*forward set on the "
                                         "instance .*_hf_hook"):
        lx.compress_model(model, rank=4, progress=False)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    # remove_hook_from_module binds the class's forward again: no forward of its own.
    hooks.remove_hook_from_module(model[0])
    W = model[0].weight.detach().clone()
    lx.compress_model(model, rank=4, progress=False)
    assert isinstance(model[0], lx.LowRankLinear)
    torch.testing.assert_close((model[0].B @ model[0].A).double(), _truncated(W, 4),
                               rtol=1e-8, atol=1e-8)


def test_add_lora_leaves_a_layer_with_an_instance_forward_alone():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    hooked = _scaled_by_ten(model[2])
    assert lx.add_lora(model, 2) == ["0"]
    assert model[2] is hooked and isinstance(model[0], lx.LoRALinear)


@pytest.mark.parametrize("build", [
    lambda layer: lx.LowRankLinear.from_linear(layer, rank=2),
    lambda layer: lx.LoRALinear(layer, 2),
], ids=["from_linear", "LoRALinear"])
def test_a_layer_named_explicitly_with_an_instance_forward_is_refused(build):
    layer = _scaled_by_ten(nn.Linear(16, 16))
    state = _state(layer)
    with pytest.raises(TypeError, match="has a forward set on the instance"):
        build(layer)
    _assert_same_state(layer, state)
    assert all(p.requires_grad for p in layer.parameters())


def test_load_compressed_refuses_a_layer_with_an_instance_forward(tmp_path):
    saved = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    lx.compress_model(saved, rank=2, progress=False)
    lx.save_compressed(saved, tmp_path / "m.safetensors")
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    hooked = _scaled_by_ten(model[2])
    state = _state(model)
    with pytest.raises(ValueError, match="stores layer '2' at rank 2, but the model has there "
                                         "an nn.Linear with a forward set on the instance"):
        lx.load_compressed(model, tmp_path / "m.safetensors")
    assert model[2] is hooked and type(model[0]) is nn.Linear
    _assert_same_state(model, state)


# --- 2. state besides the weight and bias ---------------------------------------------
def _holding_more():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                          nn.Linear(16, 16))
    model[0].register_buffer("input_scale", torch.arange(16.0))
    model[1].register_parameter("gate", nn.Parameter(torch.ones(16)))
    model[2].add_module("observer", nn.Identity())
    return model


def test_compress_model_leaves_layers_holding_more_than_weight_and_bias_alone():
    model = _holding_more()
    kept = [model[i] for i in range(3)]
    state = _state(model)
    W3 = model[3].weight.detach().clone()
    report = lx.compress_model(model, rank=2, progress=False)
    assert [model[i] for i in range(3)] == kept
    assert isinstance(model[3], lx.LowRankLinear)
    torch.testing.assert_close((model[3].B @ model[3].A).double(), _truncated(W3, 2),
                               rtol=1e-5, atol=1e-5)
    for name, held in (("0", "input_scale (buffer)"), ("1", "gate (parameter)"),
                       ("2", "observer (submodule)")):
        assert held in _note(report, name)
    # Nothing the three held left the model.
    now = model.state_dict()
    for key, value in state.items():
        if not key.startswith("3."):
            assert torch.equal(now[key], value), key
    assert isinstance(model[2].observer, nn.Identity)


def test_a_plain_attribute_is_named_in_the_report():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    model[0].tag = "keep-me"
    report = lx.compress_model(model, rank=2, progress=False)
    assert isinstance(model[0], lx.LowRankLinear)
    assert "tag" in _note(report, "0") and "not carried over" in _note(report, "0")
    assert "tag" not in _note(report, "1")


def test_add_lora_wraps_layers_holding_more_and_keeps_it():
    model = _holding_more()
    state = _state(model)
    x = torch.randn(3, 16)
    before = model(x)
    assert lx.add_lora(model, 2) == ["0", "1", "2", "3"]
    # The base layers keep what they held, under the adapter.
    now = model.state_dict()
    for key, value in state.items():
        index, _, rest = key.partition(".")
        assert torch.equal(now[f"{index}.base.{rest}"], value), key
    torch.testing.assert_close(model(x), before)  # B starts at zero


@pytest.mark.parametrize("strict", [True, False])
def test_load_compressed_refuses_a_layer_holding_more_than_weight_and_bias(tmp_path, strict):
    saved = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                          nn.Linear(16, 16))
    lx.compress_model(saved, rank=2, progress=False)
    lx.save_compressed(saved, tmp_path / "m.safetensors")
    model = _holding_more()
    layers = list(model)
    state = _state(model)
    with pytest.raises(ValueError, match="stores layer '0' at rank 2, but the model has there "
                                         r"an nn.Linear holding input_scale \(buffer\)"):
        lx.load_compressed(model, tmp_path / "m.safetensors", strict=strict)
    assert list(model) == layers
    _assert_same_state(model, state)


# --- 3. weights sharing storage -----------------------------------------------------
class _Views(nn.Module):
    """p and q hold the halves of ``big``; r is a view of ``s``'s weight; t owns its own."""

    def __init__(self):
        super().__init__()
        self.big = nn.Parameter(torch.randn(32, 16))
        self.p = nn.Linear(16, 16, bias=False)
        self.q = nn.Linear(16, 16, bias=False)
        self.p.weight = nn.Parameter(self.big.data[:16])
        self.q.weight = nn.Parameter(self.big.data[16:])
        self.s = nn.Linear(16, 16)
        self.r = nn.Linear(16, 16)
        self.r.weight = nn.Parameter(self.s.weight.data.T)
        self.t = nn.Linear(16, 16)

    def forward(self, x):
        return self.t(self.s(self.r(self.q(self.p(x))))) + x @ self.big[:16].T


def _storage_elements(model):
    storages = {}
    for t in model.parameters():
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
    return sum(storages.values())


def test_weights_sharing_storage_stay_dense():
    model = _Views()
    before = _storage_elements(model)
    Wt = model.t.weight.detach().clone()
    report = lx.compress_model(model, rank=2, progress=False)
    for name, other in (("p", "big"), ("q", "big"), ("r", "s.weight"), ("s", "r.weight")):
        layer = getattr(model, name)
        assert type(layer) is nn.Linear, name
        assert f"shares its storage with {other}" in _note(report, name)
    assert model.p.weight.untyped_storage().data_ptr() == model.big.untyped_storage().data_ptr()
    assert isinstance(model.t, lx.LowRankLinear)
    torch.testing.assert_close((model.t.B @ model.t.A).double(), _truncated(Wt, 2),
                               rtol=1e-5, atol=1e-5)
    # Memory shrinks by t's weight less its factors, as the report counts it.
    assert _storage_elements(model) == before - 16 * 16 + 2 * (16 + 16)
    dense = 16 * 16
    assert report.ratio == pytest.approx((4 * dense + 2 * 32) / (5 * dense))


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "mkldnn", "nested", "quantized"])
def test_tensors_without_an_ordinary_storage_elsewhere_in_the_model(kind):
    # The storage check read every tensor's storage: a graph model's sparse
    # adjacency buffer beside its layers raised "Cannot access storage of
    # SparseTensorImpl" (mkldnn, nested and wrapper tensors alike).
    make = {"sparse_coo": lambda: torch.eye(4).to_sparse(),
            "sparse_csr": lambda: torch.eye(4).to_sparse_csr(),
            "mkldnn": lambda: torch.randn(4, 4).to_mkldnn(),
            "nested": lambda: torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(1, 3)]),
            "quantized": lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    model.holder = nn.Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the layouts' prototype notices
        model.holder.register_buffer("graph", make[kind]())
    weights = [layer.weight.detach().clone() for layer in model[:2]]
    lx.compress_model(model, rank=2)
    for layer, weight in zip(model[:2], weights):
        assert isinstance(layer, lx.LowRankLinear)
        torch.testing.assert_close((layer.B @ layer.A).double(), _truncated(weight, 2),
                                   rtol=1e-5, atol=1e-5)


def test_a_ratio_budget_leaves_out_weights_sharing_storage():
    model = _Views()
    report = lx.compress_model(model, ratio=0.25, progress=False)
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert ranks["p"] is ranks["q"] is ranks["r"] is ranks["s"] is None
    # The budget is t's alone: a quarter of its 256 parameters, rank 2 at 32 each.
    assert ranks["t"] == 2


# --- 4. names holding glob characters -------------------------------------------------
def _glob_named():
    return nn.ModuleDict({"x[1]": nn.Linear(16, 16), "y": nn.Linear(16, 16),
                          "blk": nn.ModuleDict({"z[0]": nn.Linear(16, 16)})})


def test_compress_model_takes_a_pattern_equal_to_a_name_with_glob_characters():
    model = _glob_named()
    W = model["x[1]"].weight.detach().clone()
    report = lx.compress_model(model, rank=2, include="x[1]", progress=False)
    assert [layer.name for layer in report.layers] == ["x[1]"]
    assert isinstance(model["x[1]"], lx.LowRankLinear)
    assert type(model["y"]) is nn.Linear and type(model["blk"]["z[0]"]) is nn.Linear
    torch.testing.assert_close((model["x[1]"].B @ model["x[1]"].A).double(), _truncated(W, 2),
                               rtol=1e-5, atol=1e-5)


def test_exclude_and_a_dotted_suffix_match_names_with_glob_characters():
    model = _glob_named()
    report = lx.compress_model(model, rank=2, exclude=["x[1]", "z[0]"], progress=False)
    assert [layer.name for layer in report.layers] == ["y"]
    assert type(model["x[1]"]) is nn.Linear and type(model["blk"]["z[0]"]) is nn.Linear


def test_add_lora_and_split_attention_take_a_pattern_equal_to_a_name():
    model = _glob_named()
    assert lx.add_lora(model, 2, include="z[0]") == ["blk.z[0]"]
    attention = nn.ModuleDict({"a[0]": nn.MultiheadAttention(16, 2),
                               "b": nn.MultiheadAttention(16, 2)})
    assert lx.split_attention(attention, include="a[0]") == ["a[0]"]
    assert type(attention["b"]) is nn.MultiheadAttention
