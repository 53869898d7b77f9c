"""from_peft: a peft model's LoRA Linear layers become LoRALinear with the same outputs."""

import copy
import json
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lowrank_ext as lx

peft = pytest.importorskip("peft")


def _base(dtype=torch.float64):
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(20, 32, dtype=dtype), act=nn.ReLU(),
        fc2=nn.Linear(32, 16, dtype=dtype), act2=nn.Tanh(),
        head=nn.Linear(16, 4, dtype=dtype)))


def _peft_model(dtype=torch.float64, base=None, **config):
    config = {**dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False),
              **config}
    base = _base(dtype) if base is None else copy.deepcopy(base)
    return peft.get_peft_model(base, peft.LoraConfig(**config))


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(peft_model, snapshot):
    """The module types and every tensor of ``peft_model`` are as in ``snapshot``."""
    types, state = _snapshot(peft_model)
    assert types == snapshot[0]
    for key, value in state.items():
        torch.testing.assert_close(value, snapshot[1][key], rtol=0, atol=0)


@pytest.mark.parametrize("config", [dict(), dict(use_rslora=True), dict(lora_dropout=0.1)])
def test_outputs_parameters_and_flags_carry_over(config):
    peft_model = _peft_model(**config).eval()
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    expected = peft_model(x)
    peft_fc1 = peft_model.base_model.model.fc1
    base_weight, A = peft_fc1.base_layer.weight, peft_fc1.lora_A["default"].weight
    model = lx.from_peft(peft_model)
    assert model is peft_model.get_base_model()
    assert isinstance(model.fc1, lx.LoRALinear) and isinstance(model.fc2, lx.LoRALinear)
    assert type(model.head) is nn.Linear
    torch.testing.assert_close(model(x), expected)
    assert model.fc1.base.weight is base_weight  # shared, not copied
    torch.testing.assert_close(model.fc1.A, A, rtol=0, atol=0)
    assert model.fc1.scale == peft_fc1.scaling["default"]
    assert model.fc1.rslora == config.get("use_rslora", False)
    if "lora_dropout" in config:
        assert isinstance(model.fc1.dropout, nn.Dropout)
        assert model.fc1.dropout.p == config["lora_dropout"]
    else:
        assert isinstance(model.fc1.dropout, nn.Identity)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.A", "fc1.B", "fc2.A", "fc2.B"}
    assert not model.training


def test_a_changed_scale_carries_over():
    peft_model = _peft_model().eval()
    peft_model.base_model.model.fc2.set_scale("default", 0.5)
    x = torch.randn(6, 20, dtype=torch.float64)
    expected = peft_model(x)
    model = lx.from_peft(peft_model)
    assert model.fc2.scale == 0.5 * 8 / 4 and model.fc1.scale == 8 / 4
    torch.testing.assert_close(model(x), expected)


def test_the_merged_state_carries_over():
    peft_model = _peft_model().eval()
    x = torch.randn(6, 20, dtype=torch.float64)
    unmerged = peft_model(x)
    peft_model.merge_adapter()
    merged = peft_model(x)
    model = lx.from_peft(peft_model)
    assert model.fc1.merged and model.fc2.merged
    torch.testing.assert_close(model(x), merged)
    model.fc1.unmerge()
    model.fc2.unmerge()
    torch.testing.assert_close(model(x), unmerged)


def test_training_gives_peft_gradients():
    peft_model = _peft_model()
    reference = copy.deepcopy(peft_model)
    model = lx.from_peft(peft_model)
    x = torch.randn(8, 20, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for name in ("fc1", "fc2"):
        peft_layer = getattr(reference.base_model.model, name)
        ours = getattr(model, name)
        torch.testing.assert_close(ours.A.grad, peft_layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(ours.B.grad, peft_layer.lora_B["default"].weight.grad)


def test_choosing_among_adapters():
    peft_model = _peft_model()
    peft_model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"],
                                                    init_lora_weights=False))
    peft_model.eval()
    with pytest.raises(ValueError, match="holds adapters \\['default', 'other'\\]; choose one"):
        lx.from_peft(peft_model)
    with pytest.raises(ValueError, match="no adapter named 'third'"):
        lx.from_peft(peft_model, adapter="third")
    peft_model.set_adapter("other")
    x = torch.randn(4, 20, dtype=torch.float64)
    expected = peft_model(x)
    model = lx.from_peft(peft_model, adapter="other")
    assert type(model.fc1) is nn.Linear  # "other" does not adapt fc1
    assert isinstance(model.fc2, lx.LoRALinear) and model.fc2.rank == 2
    torch.testing.assert_close(model(x), expected)


def test_adapters_peft_runs_together_are_named_when_one_is_carried_over():
    # set_adapter with a list sums the adapters' outputs in peft; the
    # converted model runs the chosen one only, so its outputs differ.
    peft_model = _peft_model()
    peft_model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"],
                                                    init_lora_weights=False))
    peft_model.eval()
    reference = copy.deepcopy(peft_model)  # runs "default" alone
    peft_model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 20, dtype=torch.float64)
    assert not torch.allclose(peft_model(x), reference(x))  # both adapters count there
    # Warned before anything changes: as an error it leaves the model as it was.
    snapshot = _snapshot(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="peft also runs"):
            lx.from_peft(peft_model, adapter="default")
    _assert_unchanged(peft_model, snapshot)
    with pytest.warns(UserWarning, match="peft also runs \\['other'\\] where 'default' is "
                                         "active .*, in layer\\(s\\) fc2; only 'default' is "
                                         "carried over") as record:
        model = lx.from_peft(peft_model, adapter="default")
    assert record[0].filename == __file__  # the caller's line, past the package's wrappers
    torch.testing.assert_close(model(x), reference(x))
    # Where the chosen adapter runs alone, nothing is said.
    peft_model = _peft_model()
    peft_model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["fc2"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.from_peft(peft_model, adapter="default")


def test_adapters_on_split_attention_are_named_when_saved(tmp_path):
    # nn.MultiheadAttention has no q_proj / k_proj / v_proj, and peft's adapter
    # on its out_proj never runs: loaded into the original model, peft dropped
    # them without a word. Into a base split the same way they load.
    torch.manual_seed(0)
    original = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0,
                                                        batch_first=True), nn.Linear(16, 2))
    original.eval()
    model = copy.deepcopy(original)
    lx.split_attention(model)
    lx.add_lora(model, 2, include=["*q_proj", "*out_proj", "1"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_()
    with pytest.warns(UserWarning, match="save_peft_adapter: 0.self_attn.q_proj, "
                                         "0.self_attn.out_proj adapt projections of a "
                                         "SplitMultiheadAttention .*lx.split_attention on it"):
        lx.save_peft_adapter(model, tmp_path / "adapter")
    base = copy.deepcopy(original)
    lx.split_attention(base)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # Without adapters in split attention, nothing is said.
    plain = copy.deepcopy(original)
    lx.add_lora(plain, 2, include="1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.save_peft_adapter(plain, tmp_path / "plain")


@pytest.mark.parametrize("config, error, match", [
    (dict(alora_invocation_tokens=[1, 2]), ValueError, "LoRA variant \\(ALoraLinearVariant\\)"),
    (dict(lora_bias=True), ValueError, "lora_bias=True"),
])
@pytest.mark.filterwarnings("ignore:aLoRA is currently only supported")
def test_unsupported_layers_leave_the_model_unchanged(config, error, match):
    peft_model = _peft_model(**config)
    snapshot = _snapshot(peft_model)
    with pytest.raises(error, match=match):
        lx.from_peft(peft_model)
    _assert_unchanged(peft_model, snapshot)


def test_non_linear_base_and_bad_arguments():
    model = nn.Sequential(OrderedDict(emb=nn.Embedding(10, 8), fc=nn.Linear(8, 8)))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["emb", "fc"]))
    with pytest.raises(TypeError, match="layer 'emb' adapts a Embedding"):
        lx.from_peft(peft_model)
    assert not isinstance(peft_model.get_base_model().fc, lx.LoRALinear)
    with pytest.raises(ValueError, match="has no peft LoRA layer"):
        lx.from_peft(_base())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lx.from_peft("model")
    with pytest.raises(TypeError, match="adapter must be a str"):
        lx.from_peft(_peft_model(), adapter=1)


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_a_linear_subclass_with_its_own_forward_is_refused_before_anything_changes():
    # peft calls the base layer; LoRALinear would compute with its weight
    # and skip that forward. The refused layer comes after one that converts.
    model = _base()
    model.fc2 = _DoubledLinear(32, 16, dtype=torch.float64)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["fc1", "fc2"],
                                                            init_lora_weights=False))
    snapshot = _snapshot(peft_model)
    with pytest.raises(TypeError, match="layer 'fc2' adapts a _DoubledLinear, a subclass of "
                                        "nn.Linear with its own forward"):
        lx.from_peft(peft_model)
    _assert_unchanged(peft_model, snapshot)


def test_a_linear_subclass_that_keeps_its_forward_converts():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    model = _base()
    model.fc2 = NonDynamicallyQuantizableLinear(32, 16, dtype=torch.float64)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["fc1", "fc2"],
                                                            init_lora_weights=False)).eval()
    x = torch.randn(3, 20, dtype=torch.float64)
    expected = peft_model(x)
    converted = lx.from_peft(peft_model)
    assert isinstance(converted.fc2, lx.LoRALinear)
    torch.testing.assert_close(converted(x), expected)


def test_float32_adapters_on_a_bfloat16_base_are_cast_with_a_warning():
    peft_model = _peft_model(dtype=torch.bfloat16)  # peft keeps float32 adapters here
    assert peft_model.base_model.model.fc1.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 20, dtype=torch.bfloat16)
    expected = peft_model(x)
    with pytest.warns(UserWarning, match="adapters stored in torch.float32 were cast to"):
        model = lx.from_peft(peft_model)
    assert model.fc1.A.dtype == model.fc1.B.dtype == torch.bfloat16
    got = model(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=4e-2, atol=4e-2)


# --- save_peft_adapter ----------------------------------------------------------------
def _adapted(original, **lora):
    """A copy of ``original`` with adapters (non-zero B) on fc1, fc2 (rank 4) and head (2)."""
    model = copy.deepcopy(original)
    lx.add_lora(model, 4, 8, include=["fc1", "fc2"], **lora)
    lx.add_lora(model, 2, 3, include="head", freeze=False, **lora)
    for module in model.modules():
        if isinstance(module, lx.LoRALinear):
            with torch.no_grad():
                module.B.normal_()
    return model.eval()


@pytest.mark.parametrize("lora", [dict(), dict(rslora=True), dict(dropout=0.1)])
def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path, lora):
    original = _base()
    model = _adapted(original, **lora)
    names = lx.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert names == ["fc1", "fc2", "head"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter").eval()
    config = loaded.peft_config["default"]
    assert config.r == 4 and config.lora_alpha == 8 and config.use_rslora == lora.get(
        "rslora", False)
    assert config.rank_pattern == {"head": 2} and config.alpha_pattern == {"head": 3}
    assert config.base_model_name_or_path == "tiny"
    for name in names:
        layer = getattr(loaded.base_model.model, name)
        assert layer.scaling["default"] == getattr(model, name).scale
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x))
    # And back: from_peft gives the same layers again.
    back = lx.from_peft(loaded)
    for name in names:
        torch.testing.assert_close(getattr(back, name).A, getattr(model, name).A)
        torch.testing.assert_close(getattr(back, name).B, getattr(model, name).B)


def test_save_peft_adapter_refuses_what_peft_cannot_express(tmp_path):
    model = _adapted(_base())
    model.fc1.scale = 1.25  # as after from_peft of a set_scale'd adapter
    with pytest.raises(ValueError, match="layer 'fc1' has scale 1.25, not alpha / rank"):
        lx.save_peft_adapter(model, tmp_path / "a")
    mixed = copy.deepcopy(_base())
    lx.add_lora(mixed, 4, include="fc1", rslora=True)
    lx.add_lora(mixed, 4, include="fc2")
    with pytest.raises(ValueError, match="one rslora setting per adapter"):
        lx.save_peft_adapter(mixed, tmp_path / "b")
    with pytest.raises(ValueError, match="has no LoRALinear layer"):
        lx.save_peft_adapter(_base(), tmp_path / "c")
    with pytest.raises(TypeError, match="directory must be a str or os.PathLike, got int"):
        lx.save_peft_adapter(_adapted(_base()), 3)
    with pytest.raises(ValueError, match="directory is empty; give a directory name"):
        lx.save_peft_adapter(_adapted(_base()), "")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        lx.save_peft_adapter(_adapted(_base()), tmp_path / "file")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _nudged(model):
    """The adapters moved off their start, as training does."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".A", ".B")) or "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_a_pissa_adapter_loads_in_peft_onto_the_original_weights(tmp_path):
    # PiSSA left the residual in the base weights; peft rebuilds it from the
    # original ones only when the config says "pissa" (it would add the
    # adapter to the whole weight otherwise). peft's PiSSA takes no float64.
    original = _base(torch.float32)
    model = copy.deepcopy(original)
    lx.add_lora(model, 4, 8, init="pissa", include=["fc1", "fc2"])
    _nudged(model).eval()
    lx.save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "pissa"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter")
    x = torch.randn(5, 20)
    torch.testing.assert_close(loaded.eval()(x), model(x))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_peft_adapter_that_changed_its_base_goes_back_to_peft(tmp_path, init):
    original = _base(torch.float32)
    model = lx.from_peft(_nudged(_peft_model(init_lora_weights=init, base=original)))
    assert model.fc1.init == init
    with pytest.raises(RuntimeError, match=f"init='{init}' took A and B out of the base"):
        model.fc1.reset_parameters()
    lx.save_peft_adapter(model.eval(), tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter")
    x = torch.randn(5, 20)
    torch.testing.assert_close(loaded.eval()(x), model(x))


def test_base_changing_inits_peft_cannot_rebuild_are_refused(tmp_path):
    fast = copy.deepcopy(_base())
    lx.add_lora(fast, 4, init="pissa_niter_2", include="fc1")
    with pytest.raises(ValueError, match="layer 'fc1' was initialised with "
                                         "init='pissa_niter_2'.*randomized SVD"):
        lx.save_peft_adapter(fast, tmp_path / "a")
    mixed = copy.deepcopy(_base())
    lx.add_lora(mixed, 4, init="pissa", include="fc1")
    lx.add_lora(mixed, 4, include="fc2")
    with pytest.raises(ValueError, match="one init_lora_weights per adapter.*fc1 'pissa'; "
                                         "fc2 'a random init'"):
        lx.save_peft_adapter(mixed, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- review: states peft can be in -------------------------------------------------------
def test_another_adapter_merged_where_the_chosen_one_is_absent_is_refused():
    peft_model = _peft_model(target_modules=["fc1"])
    peft_model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["fc2"],
                                                init_lora_weights=False))
    peft_model.base_model.merge_adapter(adapter_names=["b"])
    snapshot = _snapshot(peft_model)
    with pytest.raises(ValueError, match="layer 'fc2' has other adapters merged into its base "
                                         "weight \\(\\['b'\\]\\)"):
        lx.from_peft(peft_model, adapter="default")
    assert _snapshot(peft_model)[0] == snapshot[0]


@pytest.mark.parametrize("how", ["layers", "context"])
def test_disabled_adapters_are_refused_not_turned_back_on(how):
    peft_model = _peft_model().eval()
    if how == "layers":
        peft_model.base_model.disable_adapter_layers()
        with pytest.raises(ValueError, match="has its adapters disabled in peft"):
            lx.from_peft(peft_model)
    else:
        with peft_model.disable_adapter():
            with pytest.raises(ValueError, match="has its adapters disabled in peft"):
                lx.from_peft(peft_model)
    assert not isinstance(peft_model.get_base_model().fc1, lx.LoRALinear)


@pytest.mark.parametrize("config", [dict(r=40), dict(lora_alpha=0), dict(lora_alpha=-8)])
def test_ranks_past_the_layer_and_any_alpha_that_peft_takes_convert(config):
    # fc2 is 32 → 16: r = 40 is past min(out, in), which peft accepts.
    peft_model = _peft_model(**config).eval()
    x = torch.randn(4, 20, dtype=torch.float64)
    expected = peft_model(x)
    model = lx.from_peft(peft_model)
    assert model.fc2.rank == config.get("r", 4) and model.fc2.alpha == config.get("lora_alpha", 8)
    torch.testing.assert_close(model(x), expected)
    model.fc2.merge()
    torch.testing.assert_close(model(x), expected)


def _with_head_to_save(adapters=("default",)):
    peft_model = _peft_model(modules_to_save=["head"])
    for name in adapters[1:]:
        peft_model.add_adapter(name, peft.LoraConfig(r=2, target_modules=["fc1", "fc2"],
                                                     modules_to_save=["head"],
                                                     init_lora_weights=False))
    for i, name in enumerate(adapters):
        with torch.no_grad():  # as if trained: each adapter's copy of the head differs
            peft_model.base_model.model.head.modules_to_save[name].weight.add_(i + 1.0)
    return peft_model.eval()


def test_the_chosen_adapters_copy_of_a_module_to_save_takes_its_place():
    peft_model = _with_head_to_save(("default", "b"))
    reference = copy.deepcopy(peft_model)
    reference.set_adapter("b")
    x = torch.randn(4, 20, dtype=torch.float64)
    expected = reference(x)
    model = lx.from_peft(peft_model, adapter="b")  # "default" is the active one in peft
    assert type(model.head) is nn.Linear
    torch.testing.assert_close(model(x), expected)


def test_disable_lora_puts_back_the_original_of_a_module_to_save_as_peft_does():
    # The trained copy of the head kept running inside disable_lora, where
    # peft's disable_adapter() runs the original: a reference model with the
    # trained head. The original is kept outside the module tree.
    peft_model = _with_head_to_save()
    x = torch.randn(4, 20, dtype=torch.float64)
    with peft_model.disable_adapter():
        base_outputs = peft_model(x)
    adapted = peft_model(x)
    model = lx.from_peft(peft_model)
    copy_of_head, keys = model.head, set(model.state_dict())
    model.head.register_forward_hook(lambda module, args, output: output * 1.0)
    with lx.disable_lora(model):
        torch.testing.assert_close(model(x), base_outputs, rtol=0, atol=0)
        assert model.head is not copy_of_head
    assert model.head is copy_of_head and set(model.state_dict()) == keys
    assert model.head._forward_hooks  # back with its copy
    torch.testing.assert_close(model(x), adapted)
    model.float()  # cast after the conversion: the original follows
    with lx.disable_lora(model):
        torch.testing.assert_close(model(x.float()), base_outputs.float())
    with pytest.raises(ZeroDivisionError), lx.disable_lora(model):
        1 / 0
    assert model.head is copy_of_head


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.lm_head.weight = self.embed.weight  # as tie_word_embeddings

    def forward(self, ids):
        return self.lm_head(torch.relu(self.fc1(self.embed(ids)))).float()


def test_disable_lora_leaves_a_tied_original_s_weight_to_the_model():
    # The original lm_head holds the embedding's weight: making it follow a
    # copy cast to float64 cast the model's embedding, for good.
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(_TiedLM(), peft.LoraConfig(
        r=2, target_modules=["fc1"], modules_to_save=["lm_head"], init_lora_weights=False))
    ids = torch.randint(0, 10, (2, 5))
    with peft_model.disable_adapter():
        expected = peft_model(ids)
    model = lx.from_peft(peft_model)
    model.lm_head.double()  # the trained copy upcast for its logits
    with torch.no_grad(), lx.disable_lora(model):
        got = model(ids)
    assert model.embed.weight.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_disable_lora_casts_an_original_whose_copy_was_parametrized_since():
    # The copy's weight moved under parametrizations.weight.original*: the
    # original's weight, without a twin of its name, stayed float32 in a
    # float64 model and the block failed.
    torch.manual_seed(0)
    model = lx.from_peft(_peft_model(dtype=torch.float32, modules_to_save=["head"]))
    torch.nn.utils.parametrizations.weight_norm(model.head)
    model.double()
    with torch.no_grad(), lx.disable_lora(model):
        assert model(torch.randn(2, 20, dtype=torch.float64)).dtype == torch.float64


def test_a_module_to_save_compiled_on_its_own_gives_way_with_its_wrapper():
    peft_model = _with_head_to_save()
    x = torch.randn(4, 20, dtype=torch.float64)
    with peft_model.disable_adapter():
        expected = peft_model(x)
    model = lx.from_peft(peft_model)
    compiled_head = model.head = torch.compile(model.head, backend="eager")
    with lx.disable_lora(model):
        torch.testing.assert_close(model(x), expected)
    assert model.head is compiled_head


def test_save_peft_adapter_inside_disable_lora_is_refused(tmp_path):
    # The originals stood in for the trained copies: the adapter was written
    # without its trained head, silently.
    model = lx.from_peft(_with_head_to_save())
    with lx.disable_lora(model), pytest.raises(
            RuntimeError, match=r"save_peft_adapter: called inside lx.disable_lora, where the "
                                r"originals of head stand in for their trained copies"):
        lx.save_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    lx.save_peft_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_and_pickles_inside_disable_lora_are_refused(how):
    # A copy made inside the block kept its adapters off for good (no public
    # way back) and held the original head, the trained one nowhere.
    import copy
    import io

    model = lx.from_peft(_with_head_to_save())
    x = torch.randn(4, 20, dtype=torch.float64)
    adapted = model(x).detach()
    make = {"deepcopy": lambda: copy.deepcopy(model),
            "torch.save": lambda: torch.save(model, io.BytesIO())}[how]
    with lx.disable_lora(model), pytest.raises(
            RuntimeError, match=r"LoRALinear: cannot copy or pickle a layer inside "
                                r"lx.disable_lora .*copy or save the model outside the block"):
        make()
    copied = copy.deepcopy(model)  # outside: as the model is
    torch.testing.assert_close(copied(x), adapted, rtol=0, atol=0)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)


def test_adapters_converted_under_inference_mode_can_be_trained_and_loaded():
    # Cast to the base's dtype under the caller's inference_mode, they were
    # inference tensors: no training step, no load_lora_state_dict.
    peft_model = _peft_model(dtype=torch.bfloat16)  # peft keeps the adapters in float32
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the cast is named in a warning
        model = lx.from_peft(peft_model)
    assert not model.fc1.A.is_inference() and not model.fc1.B.is_inference()
    model(torch.randn(3, 20, dtype=torch.bfloat16)).float().sum().backward()
    assert model.fc1.B.grad is not None
    lx.load_lora_state_dict(model, {k: torch.zeros_like(v)
                                    for k, v in lx.lora_state_dict(model).items()})
    assert not model.fc1.A.any()


def test_modules_to_save_go_back_to_peft(tmp_path):
    original = _base()
    peft_model = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(r=4, target_modules=["fc1", "fc2"],
                                                 modules_to_save=["head"],
                                                 init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    model = lx.from_peft(peft_model.eval())
    lx.save_peft_adapter(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter").eval()
    x = torch.randn(4, 20, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x))
    # Named explicitly: a head trained next to adapters added by add_lora.
    ours = copy.deepcopy(original)
    lx.add_lora(ours, 4, include=["fc1", "fc2"])
    with torch.no_grad():
        ours.fc1.B.normal_()
        ours.head.weight.add_(2.0)
    lx.save_peft_adapter(ours, tmp_path / "mine", modules_to_save=["head"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "mine").eval()
    torch.testing.assert_close(loaded(x), ours(x))
    for bad, error, match in [("nothing", ValueError, "'nothing', which is not a submodule"),
                              (["fc1"], ValueError, "'fc1', which holds LoRA adapters"),
                              # peft would drop these without a word (its names differ).
                              (["fc1.base"], ValueError, "'fc1.base', which is inside the "
                                                         "LoRA layer 'fc1'"),
                              ([3], TypeError, "must hold module names")]:
        with pytest.raises(error, match=match):
            lx.save_peft_adapter(ours, tmp_path / "bad", modules_to_save=bad)
    assert not (tmp_path / "bad").exists()


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32, dtype=torch.float64)
        self.norm = nn.LayerNorm(32, dtype=torch.float64)
        self.fc2 = nn.Linear(32, 4, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_biases_peft_trained_go_back_to_peft(tmp_path, bias):
    original = _Normed()
    peft_model = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(
        r=4, target_modules=["fc1"], bias=bias, init_lora_weights=False))
    with torch.no_grad():  # as if trained: every trainable parameter moves
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    x = torch.randn(5, 20, dtype=torch.float64)
    expected = peft_model.eval()(x)
    model = lx.from_peft(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every trainable parameter is written
        lx.save_peft_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["bias"] == bias
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(x), expected)


@pytest.mark.parametrize("trained, bias", [("fc1.base.bias", "lora_only"),
                                           ("norm.bias", "all")])
def test_biases_trained_beside_add_lora_adapters_go_back_to_peft(tmp_path, trained, bias):
    original = _Normed()
    model = copy.deepcopy(original)
    lx.add_lora(model, 4, include="fc1")
    param = model.get_parameter(trained).requires_grad_(True)
    with torch.no_grad():
        model.fc1.B.normal_()
        param.add_(1.0)
    lx.save_peft_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["bias"] == bias
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter").eval()
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_other_trainable_parameters_are_named_in_a_warning(tmp_path):
    model = _adapted(_base())
    model.fc1.base.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="fc1.base.weight are trainable, but a peft adapter "
                                         "holds only"):
        lx.save_peft_adapter(model, tmp_path / "adapter")


def test_base_model_name_or_path_is_checked_before_anything_is_written(tmp_path):
    from pathlib import Path
    model = _adapted(_base())
    with pytest.raises(TypeError, match="base_model_name_or_path must be a str or os.PathLike, "
                                        "got int"):
        lx.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=123)
    assert not (tmp_path / "adapter").exists()
    lx.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=Path("/m/tiny"))
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    assert loaded.base_model_name_or_path == "/m/tiny"


class _Shared(nn.Module):
    """fc is registered twice (``fc`` and ``again``), head once."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16, dtype=torch.float64)
        self.again = self.fc
        self.head = nn.Linear(16, 4, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.again(torch.tanh(self.fc(x))))


def test_an_adapter_or_module_to_save_in_several_places_is_refused_writing_nothing(tmp_path):
    # peft wraps a module at the first of its names only: the second use
    # would run without the adapter.
    model = _Shared()
    lx.add_lora(model, 2, include="fc")
    with pytest.raises(ValueError, match=r"under several names: fc \(also at again\); peft "
                                         "would load each into the first"):
        lx.save_peft_adapter(model, tmp_path / "adapter")
    model = _Shared()
    lx.add_lora(model, 2, include="head")
    with pytest.raises(ValueError, match=r"several names: fc \(also at again\)"):
        lx.save_peft_adapter(model, tmp_path / "adapter", modules_to_save=["fc"])
    assert not (tmp_path / "adapter").exists()


class _SuffixNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16, dtype=torch.float64)
        self.block = nn.Module()
        self.block.fc = nn.Linear(16, 16, dtype=torch.float64)

    def forward(self, x):
        return self.block.fc(torch.tanh(self.fc(x)))


def test_a_saved_adapter_names_exactly_its_layers_where_names_are_suffixes(tmp_path):
    # "fc" as a peft target would also match block.fc, which has no adapter.
    original = _SuffixNames()
    model = copy.deepcopy(original)
    lx.add_lora(model, 4, include="fc", exclude="block.fc")
    with torch.no_grad():
        model.fc.B.normal_()
    lx.save_peft_adapter(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter")
    adapted = [n for n, m in loaded.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert adapted == ["base_model.model.fc"]
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


# --- edges found in review ---------------------------------------------------

def _small():
    return nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), nn.Tanh(),
                         nn.Linear(8, 4, dtype=torch.float64))


def test_a_module_to_save_that_was_then_adapted_is_refused(tmp_path):
    # The head's copy, adapted after from_peft, sat at "2.base": it was written
    # under a name peft drops without a word, and the trained head was lost.
    original = _small()
    peft_model = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(
        r=2, target_modules=["0"], modules_to_save=["2"], init_lora_weights=False))
    model = lx.from_peft(peft_model)
    lx.add_lora(model, 2, include="2", freeze=False)
    with pytest.raises(ValueError, match=r"modules_to_save would hold \(from from_peft\) "
                                         r"'2.base', which is inside the LoRA layer '2'"):
        lx.save_peft_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_failed_conversion_leaves_the_peft_model_as_it_was():
    peft_model = peft.get_peft_model(_small(), peft.LoraConfig(
        r=2, target_modules=["0"], modules_to_save=["2"], init_lora_weights=False))
    head = peft_model.base_model.model[2]
    head.register_full_backward_hook(lambda *args: None)
    head.modules_to_save["default"].register_backward_hook(lambda *args: None)
    snapshot = _snapshot(peft_model)
    with pytest.raises(RuntimeError, match="cannot replace '2'.*backward hooks of both kinds"):
        lx.from_peft(peft_model)
    _assert_unchanged(peft_model, snapshot)
    assert not hasattr(head.modules_to_save["default"], "_lowrank_ext_modules_to_save")


def test_an_interrupted_conversion_is_undone(interrupt_swap):
    peft_model = _peft_model()
    snapshot = _snapshot(peft_model)
    calls = interrupt_swap(2)
    with pytest.raises(KeyboardInterrupt):
        lx.from_peft(peft_model)
    assert calls == ["fc1", "fc2"]
    _assert_unchanged(peft_model, snapshot)


@pytest.mark.parametrize("wrapper", ["PeftModel", "LoraModel"])
def test_a_peft_wrapper_converted_in_place_saves_under_the_models_names(tmp_path, wrapper):
    # Saving the PeftModel one still holds wrote 'base_model.model.0'-style
    # names that peft could not find in the original model.
    original = _small()
    config = peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    if wrapper == "PeftModel":
        held = peft.get_peft_model(copy.deepcopy(original), config)
        expected_root = held.get_base_model()
    else:
        held = peft.LoraModel(copy.deepcopy(original), config, "default")
        expected_root = held.model
    assert lx.from_peft(held) is expected_root
    assert lx.save_peft_adapter(held, tmp_path / "a") == ["0"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "a").eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), expected_root.eval()(x), rtol=0, atol=1e-12)


def test_modules_to_save_that_peft_would_match_to_an_adapted_layer_are_refused(tmp_path):
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.subhead = nn.Linear(8, 8, dtype=torch.float64)
            self.head = nn.Linear(8, 4, dtype=torch.float64)
            self.block = nn.Module()
            self.block.head = nn.Linear(8, 8, dtype=torch.float64)

        def forward(self, x):
            return self.head(torch.tanh(self.block.head(self.subhead(x))))

    # peft wraps every module whose name ends with the entry ("subhead" for
    # "head"): an adapted one fails to load.
    model = Heads()
    lx.add_lora(model, 2, include="subhead")
    with pytest.raises(ValueError, match=r"modules_to_save names 'head', but peft would take "
                                         r"subhead.*hold adapters"):
        lx.save_peft_adapter(model, tmp_path / "a", modules_to_save=["head"])
    # ... and adapts no layer named by the entry below it ("block.head").
    model = Heads()
    lx.add_lora(model, 2, include="block.head")
    with pytest.raises(ValueError, match=r"peft would take block.head.*hold adapters"):
        lx.save_peft_adapter(model, tmp_path / "a", modules_to_save=["head"])
    assert not (tmp_path / "a").exists()
    # A plain module matched too is written as well (peft's load expects it),
    # and peft loads the adapter with the same outputs.
    original = nn.Sequential(*[nn.Linear(8, 8, dtype=torch.float64) for _ in range(13)])
    model = copy.deepcopy(original)
    lx.add_lora(model, 2, include="0", freeze=False)
    with torch.no_grad():
        model[0].B.normal_()
        model[2].weight.add_(1.0)
    lx.save_peft_adapter(model, tmp_path / "b", modules_to_save=["2"])  # "12" ends with "2"
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["2", "12"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "b").eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=1e-12)


def test_peft_layers_it_cannot_convert_are_named():
    def embedding_and_linear():
        return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))

    # An adapter on an Embedding alone: its A is in lora_embedding_A.
    model = peft.get_peft_model(embedding_and_linear(), peft.LoraConfig(
        r=2, target_modules=["0"]))
    with pytest.raises(TypeError, match="layer '0' adapts a Embedding; only nn.Linear"):
        lx.from_peft(model)
    adalora = peft.get_peft_model(embedding_and_linear(), peft.AdaLoraConfig(
        init_r=4, target_r=2, target_modules=["1"], total_step=10))
    with pytest.raises(TypeError, match=r"layer '1' is peft's SVDLinear \(AdaLoRA"):
        lx.from_peft(adalora)
    certain_dropout = peft.get_peft_model(embedding_and_linear(), peft.LoraConfig(
        r=2, target_modules=["1"], lora_dropout=1.0))
    with pytest.raises(ValueError, match="from_peft: layer '1' has lora_dropout 1.0"):
        lx.from_peft(certain_dropout)
    infinite = peft.get_peft_model(embedding_and_linear(), peft.LoraConfig(
        r=2, target_modules=["1"], lora_alpha=float("inf")))
    with pytest.raises(ValueError, match="from_peft: layer '1' has scaling inf"):
        lx.from_peft(infinite)
    # The Embedding holds another adapter than the one chosen: it gets its base back.
    two = peft.get_peft_model(embedding_and_linear(), peft.LoraConfig(
        r=2, target_modules=["0"]), adapter_name="a")
    two.add_adapter("b", peft.LoraConfig(r=2, target_modules=["1"], init_lora_weights=False))
    two.set_adapter("b")
    x = torch.randint(0, 10, (2, 5))
    expected = two.eval()(x)
    model = lx.from_peft(two, adapter="b")
    assert type(model[0]) is nn.Embedding and isinstance(model[1], lx.LoRALinear)
    torch.testing.assert_close(model(x), expected)


def test_an_adapter_over_conv1d_and_linear_layers_goes_back_to_peft(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    original = nn.Sequential(Conv1D(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's fan_in_fan_out notices
        peft_model = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(
            r=2, target_modules=["0", "2"], fan_in_fan_out=True, init_lora_weights=False))
        model = lx.from_peft(peft_model)
        lx.save_peft_adapter(model, tmp_path / "a")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "a").eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=1e-12)


def test_the_weights_and_the_config_are_written_together(tmp_path, monkeypatch):
    # A config that failed after the weights were renamed left new weights
    # beside the old config, which peft could not load; a directory made for
    # a save that failed was left behind.
    import lowrank_ext.files as files

    model = _adapted(_base())
    lx.save_peft_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with torch.no_grad():
        model.fc1.B.add_(1.0)
    real = files._written

    def config_fails(write, tmp, path, owner):
        if path.endswith(".json"):
            raise KeyboardInterrupt
        return real(write, tmp, path, owner)

    monkeypatch.setattr(files, "_written", config_fails)
    with pytest.raises(KeyboardInterrupt):
        lx.save_peft_adapter(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    with pytest.raises(KeyboardInterrupt):
        lx.save_peft_adapter(model, tmp_path / "new" / "adapter")
    assert not (tmp_path / "new").exists()


def test_tied_modules_to_save_are_written_whole(tmp_path):
    model = _small()
    model.extra = nn.Linear(8, 4, dtype=torch.float64)
    model.extra.weight = model[2].weight  # tied to the head
    lx.add_lora(model, 2, include="0")
    with torch.no_grad():
        model[2].weight.add_(1.0)
    lx.save_peft_adapter(model, tmp_path / "a", modules_to_save=["2", "extra"])
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    torch.testing.assert_close(tensors["base_model.model.2.weight"],
                               tensors["base_model.model.extra.weight"], rtol=0, atol=0)


def test_from_peft_remembers_the_base_model_and_task_for_saving(tmp_path):
    peft_model = peft.get_peft_model(_small(), peft.LoraConfig(
        r=2, target_modules=["0"], task_type="FEATURE_EXTRACTION", init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = "org/tiny"
    model = lx.from_peft(peft_model)
    lx.save_peft_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny"
    assert config["task_type"] == "FEATURE_EXTRACTION"
