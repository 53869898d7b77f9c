"""Model surgery on unusual module structures: lazy layers, a layer under two
names, state-dict hooks, keyword calls, expanded weights, and peft adapters on
an nn.MultiheadAttention's out_proj. Each either works (checked against the
dense model) or is refused with the model left as it was."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _flags(model):
    return [(n, p.requires_grad) for n, p in model.named_parameters()]


# --- keyword calls -------------------------------------------------------------

def test_replaced_layers_take_nn_linears_input_keyword():
    # Code written for nn.Linear may call layer(input=x); a compressed model
    # or one with adapters raised "unexpected keyword argument 'input'".
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    low = lx.LowRankLinear.from_linear(linear, rank=6)
    torch.testing.assert_close(low(input=x), low(x), rtol=0, atol=0)
    lora = lx.LoRALinear(copy.deepcopy(linear), 2)
    nn.init.normal_(lora.B)
    torch.testing.assert_close(lora(input=x), lora(x), rtol=0, atol=0)
    W = (lora.base.weight.double() + lora.scale * lora.B.double() @ lora.A.double())
    torch.testing.assert_close(lora(input=x).double(), x.double() @ W.T + linear.bias.double(),
                               rtol=1e-5, atol=1e-6)


# --- uninitialized lazy layers -----------------------------------------------

def test_add_lora_beside_an_uninitialized_lazy_layer():
    # Freezing the model's other parameters called requires_grad_() on the
    # lazy layer's, which refuse it: add_lora failed, and restoring the flags
    # failed the same way, leaving the wrapped layer frozen.
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 8))
    lx.add_lora(model, rank=2, include="2")
    assert isinstance(model[2], lx.LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"2.A", "2.B"}
    model(torch.randn(4, 5))  # the lazy layer initializes, frozen
    assert not model[0].weight.requires_grad


def test_a_failed_add_lora_restores_the_flags_of_lazy_parameters():
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 8))
    before = _flags(model)
    with pytest.raises(ValueError, match="rank"):
        lx.add_lora(model, rank=100, include="2")
    assert _flags(model) == before and type(model[2]) is nn.Linear


@pytest.mark.parametrize("make", [
    lambda layer: lx.LoRALinear(layer, 2),
    lambda layer: lx.LowRankLinear.from_linear(layer, rank=2),
], ids=["LoRALinear", "from_linear"])
def test_an_uninitialized_lazy_layer_is_refused_in_the_packages_words(make):
    layer = nn.LazyLinear(8)
    with pytest.raises(ValueError, match="uninitialized LazyLinear.*first forward"):
        make(layer)
    assert layer.weight.requires_grad


def test_load_compressed_names_an_uninitialized_lazy_layer(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    lx.compress_model(source, rank=4, progress=False)
    lx.save_compressed(source, tmp_path / "m.safetensors")
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.LazyLinear(8))
    before = _state(nn.Sequential(model[0]))
    with pytest.raises(ValueError, match="layer '2'.*uninitialized LazyLinear"):
        lx.load_compressed(model, tmp_path / "m.safetensors")
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.LazyLinear
    for key, value in _state(nn.Sequential(model[0])).items():
        assert torch.equal(value, before[key])


# --- load_compressed: names and kinds ----------------------------------------

class _Aliased(nn.Module):
    def __init__(self, alias):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)
        if alias:
            self.b2 = self.b  # the same layer under a second name

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("strict", [True, False])
def test_load_compressed_into_a_layer_held_under_a_name_the_file_does_not_know(tmp_path,
                                                                            strict):
    # The file names the layer once; the model also holds it as b2. It was
    # refused ("has no tensor 'b2.A'"), with strict=False too.
    torch.manual_seed(0)
    source = _Aliased(alias=False)
    lx.compress_model(source, rank=4, progress=False)
    lx.save_compressed(source, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    model = _Aliased(alias=True)
    lx.load_compressed(model, tmp_path / "m.safetensors", strict=strict)
    assert isinstance(model.b, lx.LowRankLinear) and model.b2 is model.b
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_load_compressed_names_a_data_parallel_prefix(tmp_path):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    lx.compress_model(inner, rank=4, progress=False)

    class Wrapper(nn.Module):  # names its model "module", as DataParallel does
        def __init__(self, module):
            super().__init__()
            self.module = module

    lx.save_compressed(Wrapper(inner), tmp_path / "m.safetensors")
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    before = _state(model)
    with pytest.raises(ValueError, match=r"named 'module\.…'.*DataParallel.*\.module"):
        lx.load_compressed(model, tmp_path / "m.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_load_compressed_into_a_wrapper_names_its_module(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    lx.compress_model(source, rank=4, progress=False)
    lx.save_compressed(source, tmp_path / "m.safetensors")

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapper = Wrapper(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)))
    with pytest.raises(ValueError, match=r"'module\.0'.*load into its \.module"):
        lx.load_compressed(wrapper, tmp_path / "m.safetensors")
    lx.load_compressed(wrapper.module, tmp_path / "m.safetensors")
    x = torch.randn(3, 16)
    torch.testing.assert_close(wrapper.module(x), source(x), rtol=0, atol=0)


def test_load_compressed_says_why_a_parametrized_layer_is_not_compressed(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    lx.compress_model(source, rank=4, progress=False)
    lx.save_compressed(source, tmp_path / "m.safetensors")
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    nn.utils.parametrizations.weight_norm(model[2])
    with pytest.raises(ValueError, match="layer '2'.*parametrized nn.Linear.*"
                                         "remove_parametrizations"):
        lx.load_compressed(model, tmp_path / "m.safetensors")
    assert type(model[0]) is nn.Linear


# --- state-dict hooks --------------------------------------------------------

def _hooked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    model[2].register_state_dict_post_hook(lambda module, state, prefix, local: None)
    model[2].register_load_state_dict_post_hook(lambda module, keys: None)
    return model


def test_compress_model_warns_of_state_dict_hooks_it_cannot_move():
    # They were dropped without a word: written for the Linear's keys
    # (weight), they cannot run for the LowRankLinear.
    model = _hooked_model()
    with pytest.warns(UserWarning, match=r"'2'.*state-dict hooks \(register_state_dict_post_hook, "
                                         r"register_load_state_dict_post_hook\)"):
        lx.compress_model(model, rank=4, progress=False)
    assert isinstance(model[2], lx.LowRankLinear)


def test_load_compressed_warns_of_state_dict_hooks_it_cannot_move(tmp_path):
    source = _hooked_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lx.compress_model(source, rank=4, progress=False)
    lx.save_compressed(source, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="'2'.*state-dict hooks"):
        lx.load_compressed(_hooked_model(), tmp_path / "m.safetensors")


def test_add_lora_keeps_state_dict_hooks_without_a_warning():
    # The wrapped layer stays in the model and still runs them.
    model = _hooked_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.add_lora(model, rank=2, include="2")


# --- expanded (stride-0) weights ---------------------------------------------

def _expanded_linear():
    layer = nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight = nn.Parameter(torch.randn(1, 8).expand(6, 8))
    return layer


def test_pissa_on_an_expanded_weight_is_refused_before_the_base_changes():
    # The residual cannot be written into a weight whose rows are one memory
    # location: torch raised in its own words, after the base was frozen.
    torch.manual_seed(0)
    base = _expanded_linear()
    weight = base.weight.detach().clone()
    with pytest.raises(ValueError, match="share memory.*contiguous"):
        lx.LoRALinear(base, 2, init="pissa")
    assert base.weight.requires_grad and base.bias.requires_grad
    assert torch.equal(base.weight, weight)


def test_pissa_on_an_overlapping_weight_is_refused():
    # Strides that overlap without a 0 (as_strided): the residual written in
    # place silently changed the output.
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    with torch.no_grad():
        base.weight = nn.Parameter(torch.randn(64).as_strided((6, 8), (1, 1)))
    weight = base.weight.detach().clone()
    with pytest.raises(ValueError, match="may share memory"):
        lx.LoRALinear(base, 2, init="pissa")
    assert torch.equal(base.weight, weight)


def test_merge_lora_refuses_an_expanded_base_weight_before_merging_any():
    # Layers merged before the one that failed came back re-rounded.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), _expanded_linear())
    lx.add_lora(model, rank=2)
    for lora in (model[0], model[2]):
        nn.init.normal_(lora.B)
    before = _state(model)
    with pytest.raises(ValueError, match="'?2'?.*share memory"):
        lx.merge_lora(model)
    assert not model[0].merged and not model[2].merged
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


# --- peft adapters on an nn.MultiheadAttention's out_proj ----------------------

@pytest.mark.parametrize("subclass", [False, True], ids=["mha", "mha-subclass"])
def test_from_peft_refuses_an_adapter_on_a_multihead_attentions_out_proj(subclass):
    # nn.MultiheadAttention reads out_proj.weight itself: the adapter never
    # ran, and merge_lora after from_peft switched it on.
    peft = pytest.importorskip("peft")

    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            attention = (type("MyAttention", (nn.MultiheadAttention,), {}) if subclass
                         else nn.MultiheadAttention)
            self.attn = attention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 8)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(WithAttention(), peft.LoraConfig(
            r=2, target_modules=["out_proj"], init_lora_weights=False))
    layer = model.base_model.model.attn.out_proj
    # split_attention leaves subclasses alone: no advice to call it for one.
    advice = ("MyAttention \\(a subclass of nn.MultiheadAttention, which lx.split_attention "
              "leaves alone\\) at 'attn'" if subclass else
              "nn.MultiheadAttention at 'attn'.*lx.split_attention\\(model\\) first")
    with pytest.raises(TypeError, match="'attn.out_proj'.*" + advice):
        lx.from_peft(model)
    assert model.base_model.model.attn.out_proj is layer


# --- layers also held outside the module tree ----------------------------------

class _RunsFromAList(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 8)
        self._order = [self.fc1, self.fc2]  # a plain list: not registered

    def forward(self, x):
        for layer in self._order:
            x = layer(x)
        return x


class _RunsFromANestedDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 8)
        self._routes = {"main": [self.fc1, (self.fc2,)]}

    def forward(self, x):
        first, (second,) = self._routes["main"]
        return second(first(x))


def test_a_layer_held_in_a_nested_container_is_named_in_a_warning():
    torch.manual_seed(0)
    model = _RunsFromANestedDict()
    with pytest.warns(UserWarning, match=r"'fc2'.*also held in _routes") as record:
        lx.compress_model(model, rank=2, progress=False)
    # The warning names the caller's line, not the package's.
    assert all(w.filename == __file__ for w in record if "also held" in str(w.message))


@pytest.mark.parametrize("change", [
    lambda m: lx.compress_model(m, rank=2, progress=False),
    lambda m: lx.compress_model(m, rank=2, calibration=[torch.randn(8, 16)], progress=False),
    lambda m: lx.add_lora(m, rank=2),
], ids=["compress", "compress-calibrated", "add_lora"])
def test_a_layer_also_held_in_a_plain_list_is_named_in_a_warning(change):
    # The forward calls the layers from the list, which the swap cannot
    # reach: the report said compressed, the forward still ran the dense
    # layers (adapters never ran), without a word.
    torch.manual_seed(0)
    model = _RunsFromAList()
    with pytest.warns(UserWarning, match=r"'fc1'.*also held in _order.*still runs the "
                                         r"replaced layer") as record:
        change(model)
    assert any("'fc2'" in str(w.message) for w in record)


def test_layers_in_module_containers_give_no_such_warning():
    class RunsFromAModuleList(_RunsFromAList):
        def __init__(self):
            nn.Module.__init__(self)
            self._order = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 8)])  # registered

    torch.manual_seed(0)
    model = RunsFromAModuleList()
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.compress_model(model, rank=2, progress=False)
    assert all(isinstance(layer, lx.LowRankLinear) for layer in model._order)
    expected = x.double()
    for layer in model._order:
        expected = expected @ (layer.B.double() @ layer.A.double()).T + layer.bias.double()
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_torchs_old_spectral_norm_hooks_give_no_state_dict_warning():
    # Its state-dict hooks belong with its weight hook, which stays behind
    # with the layer by design (the factors come from the weight it computed).
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 8))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*state-dict hooks")
        lx.compress_model(model, rank=2, include="0", progress=False)
    assert isinstance(model[0], lx.LowRankLinear)


def test_the_merge_warning_names_the_callers_line():
    # Raised inside LoRALinear.merge (under @torch.no_grad()), reached through
    # merge_lora: a fixed stacklevel named lowrank_ext/lora.py.
    torch.manual_seed(0)
    model = nn.Sequential(lx.LowRankLinear(8, 8, 3))
    lx.add_lora(model, 2)
    with pytest.warns(UserWarning, match="at least as many numbers") as record:
        lx.merge_lora(model)
    assert [w.filename for w in record] == [__file__]


def test_an_empty_weight_shares_no_memory():
    from lowrank_ext.lora_layer import _elements_share_memory

    assert not _elements_share_memory(torch.empty(0).as_strided((0, 5), (1, 0)))
    assert not _elements_share_memory(torch.randn(6, 8).t())
    assert _elements_share_memory(torch.randn(1, 8).expand(6, 8))


# --- Swaps.put_back: a stand-in taken back (sensitivity probes, disable_lora) ---------
def _stand_in_for(model, name="1"):
    from lowrank_ext._modules import Swaps

    swaps = Swaps(model)
    swaps.swap(name, nn.Linear(4, 4), warn=False)
    return swaps


def test_hooks_registered_on_a_stand_in_go_back_with_working_handles_in_order():
    # They were given to the module put back in a dict their handles did not
    # reach, after its own hooks (prepend=True lost), and a backward hook lost
    # the kind torch needs to run it.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    old, calls = model[1], []
    old.register_forward_pre_hook(lambda m, a: calls.append("own"))
    swaps = _stand_in_for(model)
    handles = [model[1].register_forward_hook(lambda m, a, o: calls.append("forward")),
               model[1].register_forward_pre_hook(lambda m, a: calls.append("first"),
                                                  prepend=True),
               model[1].register_forward_hook(lambda m, a, kw, o: calls.append("kwargs"),
                                              with_kwargs=True, always_call=True),
               model[1].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))]
    swaps.put_back()
    assert model[1] is old
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert calls == ["first", "own", "forward", "kwargs", "backward"]
    for handle in handles:
        handle.remove()
    calls.clear()
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert calls == ["own"]
    assert not old._forward_hooks_with_kwargs and not old._forward_hooks_always_called


def test_hooks_removed_from_a_stand_in_stay_removed_and_staying_hooks_keep_their_place():
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    old, calls = model[1], []
    prune.l1_unstructured(old, "weight", amount=0.5)  # a pre-hook that stays with old
    handle = old.register_forward_pre_hook(lambda m, a: calls.append("user"))
    kinds_before = [type(h).__name__ for h in old._forward_pre_hooks.values()]
    swaps = _stand_in_for(model)
    handle.remove()  # while the stand-in holds it
    swaps.put_back()
    assert [type(h).__name__ for h in old._forward_pre_hooks.values()] == kinds_before[:1]
    model(torch.randn(1, 4))
    assert not calls


def test_hooks_that_stayed_behind_keep_their_neighbours_and_a_stand_in_its_removals():
    from torch.nn.utils import prune

    from lowrank_ext._modules import Swaps

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    old, calls = model[1], []
    old.register_forward_pre_hook(lambda m, a: calls.append("u1"))
    prune.l1_unstructured(old, "weight", amount=0.5)  # stays with old, between u1 and u2
    old.register_forward_pre_hook(lambda m, a: calls.append("u2"))
    stand_in = nn.Linear(4, 4)
    own = stand_in.register_forward_hook(lambda m, a, o: calls.append("stand-in"))
    swaps = Swaps(model)
    swaps.swap("1", stand_in, warn=False)
    first = model[1].register_forward_pre_hook(lambda m, a: calls.append("first"), prepend=True)
    own.remove()
    swaps.put_back()
    kinds = [getattr(h, "__name__", type(h).__name__) for h in old._forward_pre_hooks.values()]
    assert kinds == ["<lambda>", "<lambda>", "L1Unstructured", "<lambda>"]
    model(torch.randn(1, 4))
    assert calls == ["first", "u1", "u2"]
    assert not stand_in._forward_hooks  # removed while it stood in: it stays removed
    first.remove()
    calls.clear()
    model(torch.randn(1, 4))
    assert calls == ["u1", "u2"]
