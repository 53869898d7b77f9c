"""LoRA over a whole model (add_lora, lora_state_dict, load_lora_state_dict, merge_lora),
checked against peft's get_peft_model / merge_and_unload on the same weights."""

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lowrank_ext as lx
import lowrank_ext.lora_layer as lora_layer

TARGETS = ["q", "v", "out"]


def _model(dtype=torch.float64):
    return nn.Sequential(OrderedDict(
        inp=nn.Linear(12, 32, dtype=dtype),
        act=nn.GELU(),
        attn=nn.Sequential(OrderedDict(q=nn.Linear(32, 32, dtype=dtype),
                                       v=nn.Linear(32, 32, bias=False, dtype=dtype))),
        norm=nn.LayerNorm(32, dtype=dtype),
        out=nn.Linear(32, 8, dtype=dtype)))


def _names(targets=TARGETS):
    return [n for n in ("attn.q", "attn.v", "out") if n.rsplit(".", 1)[-1] in targets]


def _peft_pair(rank=4, alpha=8, rslora=False, dtype=torch.float64):
    """(peft model, our model, the plain model) over copies of one model, with peft's
    random adapters in both wrapped ones."""
    peft = pytest.importorskip("peft")
    model = _model(dtype)
    ours, plain = copy.deepcopy(model), copy.deepcopy(model)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                             init_lora_weights=False, use_rslora=rslora)
    peft_model = peft.get_peft_model(model, config)
    assert lx.add_lora(ours, rank, alpha, include=TARGETS, rslora=rslora) == _names()
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name in _names():
            layer = inner.get_submodule(name)
            ours.get_submodule(name).A.copy_(layer.lora_A["default"].weight)
            ours.get_submodule(name).B.copy_(layer.lora_B["default"].weight)
    return peft_model, ours, plain


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snapshot):
    state, types, flags = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(model.state_dict()) == set(state)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_equal_peft_unmerged_and_merged(rslora):
    peft_model, ours, plain = _peft_pair(rank=4, alpha=8, rslora=rslora)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    expected = peft_model(x)
    assert not torch.allclose(expected, plain(x))  # peft's random B: the adapters matter
    torch.testing.assert_close(ours(x), expected)
    assert ours.out.scale == peft_model.base_model.model.out.scaling["default"]

    merged_peft = peft_model.merge_and_unload()
    assert lx.merge_lora(ours) == _names()
    assert not any(isinstance(m, lx.LoRALinear) for m in ours.modules())
    assert all(type(ours.get_submodule(n)) is nn.Linear for n in _names())
    torch.testing.assert_close(ours(x), merged_peft(x))
    for name in _names():
        torch.testing.assert_close(ours.get_submodule(name).weight,
                                   merged_peft.get_submodule(name).weight)


def test_trainable_parameters_equal_peft():
    peft_model, ours, _ = _peft_pair()
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in ours.parameters()) == total
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{n}.{f}" for n in _names() for f in ("A", "B")}


def test_training_moves_only_the_adapters():
    model = _model()
    lx.add_lora(model, 2, include=["q", "out"], dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(6, 12, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # B starts at zero, so A moves from the second step on: both factors train.
    assert changed == {"attn.q.A", "attn.q.B", "out.A", "out.B"}


def test_default_init_leaves_outputs_unchanged_and_freeze_false():
    model = _model()
    reference = copy.deepcopy(model)
    x = torch.randn(7, 12, dtype=torch.float64)
    names = lx.add_lora(model, 3, freeze=False)
    assert names == ["inp", "attn.q", "attn.v", "out"]
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model.norm.weight.requires_grad  # freeze=False: only the wrapped layers freeze
    assert not model.inp.base.weight.requires_grad


def test_pissa_over_the_model_keeps_the_outputs():
    model = _model()
    reference = copy.deepcopy(model)
    lx.add_lora(model, 4, 16, include=TARGETS, init="pissa")
    x = torch.randn(9, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-10)
    assert not torch.equal(model.out.base.weight, reference.out.weight)  # the residual


def test_state_dict_round_trip_through_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    trained = _model()
    fresh = copy.deepcopy(trained)
    lx.add_lora(trained, 4, include=TARGETS)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    state = lx.lora_state_dict(trained)
    assert list(state) == [f"{n}.{f}" for n in _names() for f in ("A", "B")]
    path = tmp_path / "adapter.safetensors"
    safetensors.save_file(state, str(path))

    lx.add_lora(fresh, 4, include=TARGETS)
    x = torch.randn(4, 12, dtype=torch.float64)
    assert not torch.allclose(fresh(x), trained(x))
    lx.load_lora_state_dict(fresh, safetensors.load_file(str(path)))
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, "add_lora: rank must be >= 1, got 0"),
    (dict(rank=9, include=["q", "out"]), ValueError,
     "out is 8×32, got rank 9; leave it out \\(exclude='out', .*\\) or choose a rank up to 8"),
    (dict(rank=2.0), TypeError, "rank must be an int"),
    (dict(rank=2, alpha=-1), ValueError, "alpha must be finite and > 0"),
    (dict(rank=2, alpha=10**400), ValueError,
     "add_lora: alpha must be finite and > 0, got an int beyond float's range"),
    (dict(rank=2, init="kaiming"), ValueError, "init must be 'default', 'gaussian', 'pissa' "
                                               "or 'pissa_niter_<n>', got 'kaiming'"),
    (dict(rank=2, init="pissa_niter_x"), ValueError, "init must be"),
    (dict(rank=2, init=None), ValueError, "init must be"),
    (dict(rank=2, dropout=1.0), ValueError, "dropout must be in"),
    (dict(rank=2, rslora=1), TypeError, "rslora must be a bool"),
    (dict(rank=2, freeze="yes"), TypeError, "freeze must be a bool"),
    (dict(rank=2, include="k_proj"), ValueError, "add_lora: include pattern 'k_proj' matches no"),
    (dict(rank=2, include="q", exclude="q"), ValueError,
     "leave no nn.Linear, Conv1D or LowRankLinear layer"),
    (dict(rank=2, include=3), TypeError, "add_lora: include must be a string"),
])
def test_bad_input_leaves_the_model_as_it_was(kwargs, error, match):
    model = _model()
    snapshot = _snapshot(model)
    with pytest.raises(error, match=match):
        lx.add_lora(model, **kwargs)
    _assert_unchanged(model, snapshot)


def test_a_failure_midway_puts_weights_and_flags_back(monkeypatch):
    model = _model()
    model.norm.weight.requires_grad_(False)  # a flag the user set stays set
    snapshot = _snapshot(model)
    calls = []
    real = lora_layer.svd_truncate

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("svd did not converge")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_layer, "svd_truncate", flaky)
    with pytest.raises(RuntimeError, match="did not converge"):
        lx.add_lora(model, 4, include=TARGETS, init="pissa")
    assert len(calls) == 3  # two layers were wrapped (and their weights changed) first
    _assert_unchanged(model, snapshot)


def test_wrapped_layers_are_not_wrapped_again():
    model = _model()
    lx.add_lora(model, 2, include="q")
    with pytest.raises(ValueError,
                       match="'q' matches no nn.Linear, Conv1D or LowRankLinear layer"):
        lx.add_lora(model, 2, include="q")
    assert lx.add_lora(model, 2) == ["inp", "attn.v", "out"]


def test_not_a_model_a_bare_linear_and_no_linear():
    with pytest.raises(TypeError, match="add_lora: model must be an nn.Module"):
        lx.add_lora(object(), 2)
    with pytest.raises(TypeError, match="itself an nn.Linear.*LoRALinear"):
        lx.add_lora(nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="no nn.Linear, Conv1D or LowRankLinear layer"):
        lx.add_lora(nn.Sequential(nn.ReLU()), 2)
    for fn in (lx.lora_state_dict, lx.merge_lora):
        with pytest.raises(ValueError, match="no LoRALinear layer"):
            fn(_model())
    with pytest.raises(ValueError, match="no LoRALinear layer"):
        lx.load_lora_state_dict(_model(), {})


def test_load_refuses_wrong_keys_shapes_and_merged_layers():
    model = _model()
    lx.add_lora(model, 2, include=TARGETS)
    state = {k: v.clone().normal_() for k, v in lx.lora_state_dict(model).items()}
    snapshot = _snapshot(model)
    cases = [
        ({k: v for k, v in state.items() if k != "out.B"}, ValueError, "missing out.B"),
        ({**state, "attn.k.A": state["out.A"]}, ValueError, "unexpected attn.k.A"),
        ({**state, "out.A": torch.zeros(3, 32, dtype=torch.float64)}, ValueError,
         "out.A has shape \\(3, 32\\), the model's is \\(2, 32\\)"),
        ({**state, "out.A": [[0.0]]}, TypeError, "out.A must be a tensor"),
        # copy_ would round these, or drop the imaginary part.
        ({**state, "out.A": torch.ones(2, 32, dtype=torch.int64)}, TypeError,
         "out.A must be a floating-point tensor, got int64"),
        ({**state, "attn.q.B": state["attn.q.B"].to(torch.complex128) * (1 + 1j)}, TypeError,
         "attn.q.B must be a floating-point tensor, got complex128"),
        ({**state, "attn.v.A": state["attn.v.A"] > 0}, TypeError,
         "attn.v.A must be a floating-point tensor, got bool"),
        ([1, 2], TypeError, "state_dict must be a mapping"),
        # Past every check before, then failing halfway through the copies.
        ({**state, "out.B": torch.empty_like(state["out.B"], device="meta")},
         ValueError, "out.B is on the meta device"),
        ({**state, "out.B": state["out.B"].to_sparse()}, TypeError,
         "out.B must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
        ({**state, 3: state["out.B"]}, TypeError, "keys must be parameter names \\(str\\), got 3"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            lx.load_lora_state_dict(model, bad)
        _assert_unchanged(model, snapshot)
    model.out.merge()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="out are merged; call unmerge"):
        lx.load_lora_state_dict(model, state)
    _assert_unchanged(model, snapshot)


class _FailsWhenCopied(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise RuntimeError("copy failed")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_copy_failing_halfway_leaves_no_adapter_loaded():
    model = _model()
    lx.add_lora(model, 2, include=TARGETS)
    state = {k: v.clone().normal_() for k, v in lx.lora_state_dict(model).items()}
    last = list(state)[-1]  # every other adapter is copied before it
    state[last] = state[last].as_subclass(_FailsWhenCopied)
    snapshot = _snapshot(model)
    with pytest.raises(RuntimeError, match="copy failed"):
        lx.load_lora_state_dict(model, state)
    _assert_unchanged(model, snapshot)


def test_merge_lora_unwraps_layers_already_merged():
    model = _model()
    lx.add_lora(model, 2, include=TARGETS)
    with torch.no_grad():
        model.out.B.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = model(x)
    model.out.merge()
    assert lx.merge_lora(model) == _names()
    torch.testing.assert_close(model(x), expected)
    assert not model.out.weight.requires_grad


def test_compiled_model_matches_eager():
    model = _model()
    lx.add_lora(model, 3, include=TARGETS)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(6, 12, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model(x).sum().backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad)


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_with_dropout_on_the_meta_device(use_dora):
    # Training with dropout checks x against autocast's dtype first, and
    # torch.is_autocast_enabled raises for the meta device, which has no autocast.
    shapes = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = _model(torch.float32)
            lx.add_lora(model, 3, include=TARGETS, dropout=0.3, use_dora=use_dora)
            y = model.train()(torch.randn(2, 4, 12))
        assert y.device.type == device
        shapes.append((y.shape, y.dtype))
    assert shapes[0] == shapes[1]
    # A meta x for a layer on the CPU: the same error with dropout as without.
    errors = []
    for dropout in (0.0, 0.3):
        layer = lx.LoRALinear(nn.Linear(12, 8), 3, dropout=dropout, use_dora=use_dora).train()
        with pytest.raises(RuntimeError) as info:
            layer(torch.randn(2, 12, device="meta"))
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "W is on cpu but x is on meta" in errors[0]


def test_disable_lora_gives_the_base_model_as_peft_does():
    peft_model, ours, plain = _peft_pair()
    peft_model.eval(), ours.eval(), plain.eval()
    x = torch.randn(5, 12, dtype=torch.float64)
    adapted = ours(x)
    snapshot = _snapshot(ours)
    with lx.disable_lora(ours) as same:
        assert same is ours
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
        with peft_model.disable_adapter():
            torch.testing.assert_close(ours(x), peft_model(x))
        with lx.disable_lora(ours):  # nested blocks
            torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(ours(x), adapted, rtol=0, atol=0)
    _assert_unchanged(ours, snapshot)
    # An exception inside the block still brings the adapters back.
    with pytest.raises(RuntimeError, match="inside"):
        with lx.disable_lora(ours):
            raise RuntimeError("inside")
    torch.testing.assert_close(ours(x), adapted, rtol=0, atol=0)
    # Gradients inside the block reach nothing of the adapters.
    with lx.disable_lora(ours):
        ours(x.requires_grad_()).sum().backward()
    assert all(ours.get_submodule(n).A.grad is None for n in _names())


def test_disable_lora_under_torch_compile():
    _, ours, plain = _peft_pair()
    ours.eval()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 12, dtype=torch.float64)
    adapted = compiled(x)
    torch.testing.assert_close(adapted, ours(x))
    with lx.disable_lora(ours):
        torch.testing.assert_close(compiled(x), plain.eval()(x))
    torch.testing.assert_close(compiled(x), adapted)


def test_disable_lora_refuses_merged_layers_and_models_without_adapters():
    _, ours, _ = _peft_pair()
    ours.attn.q.merge()
    with pytest.raises(ValueError, match="layer\\(s\\) attn.q are merged; call unmerge"):
        with lx.disable_lora(ours):
            pass
    assert all(ours.get_submodule(n).adapter_enabled for n in _names())
    with pytest.raises(ValueError, match="has no LoRALinear layer"):
        with lx.disable_lora(_model()):
            pass
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        with lx.disable_lora(None):
            pass


def test_compiling_layers_of_different_scales_in_one_process():
    # A float attribute that differs between compiled calls becomes symbolic
    # in torch.compile; the scale check must not break the graph over it.
    x = torch.randn(3, 12, dtype=torch.float64)
    for alpha in (4, 8, 12):
        layer = lx.LoRALinear(nn.Linear(12, 6, dtype=torch.float64), 4, alpha)
        with torch.no_grad():
            layer.B.normal_()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), layer(x))


class _SharedBlocks(nn.Module):
    """One Linear registered twice, and one block (holding a Linear) used twice."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(10, 10, dtype=torch.float64)
        block = nn.Sequential(nn.Linear(10, 10, dtype=torch.float64), nn.Tanh())
        self.first, self.again = shared, shared
        self.blocks = nn.Sequential(block, block)

    def forward(self, x):
        return self.blocks(self.again(torch.tanh(self.first(x))))


def _dense_reference(model, x):
    """The same computation in float64 with each adapter folded into a dense weight."""
    def dense(layer):
        if isinstance(layer, lx.LoRALinear):
            W = layer.base.weight + layer.scale * (layer.B @ layer.A)
            return lambda v: v @ W.T + layer.base.bias
        return lambda v: v @ layer.weight.T + layer.bias
    h = dense(model.again)(torch.tanh(dense(model.first)(x)))
    for block in model.blocks:
        h = torch.tanh(dense(block[0])(h))
    return h


def test_a_layer_registered_in_several_places_gets_one_adapter_everywhere():
    torch.manual_seed(0)
    model = _SharedBlocks()
    names = lx.add_lora(model, 3)
    assert names == ["first", "blocks.0.0"]  # each shared layer once
    assert model.first is model.again and isinstance(model.first, lx.LoRALinear)
    assert model.blocks[0][0] is model.blocks[1][0]
    assert isinstance(model.blocks[1][0], lx.LoRALinear)
    for lora in (model.first, model.blocks[0][0]):
        with torch.no_grad():
            lora.B.normal_()
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _dense_reference(model, x))
    assert list(lx.lora_state_dict(model)) == ["first.A", "first.B", "blocks.0.0.A",
                                               "blocks.0.0.B"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(model.first.A), id(model.first.B), id(model.blocks[0][0].A),
                         id(model.blocks[0][0].B)}

    with torch.no_grad():
        before = model(x)
    assert lx.merge_lora(model) == names
    assert type(model.first) is nn.Linear and model.first is model.again
    assert type(model.blocks[1][0]) is nn.Linear
    assert not any(isinstance(m, lx.LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_all_linear_leaves_out_the_output_layer_as_peft_does():
    T = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config)
    theirs = peft.get_peft_model(copy.deepcopy(model),
                                 peft.LoraConfig(r=2, target_modules="all-linear"))
    wrapped_by_peft = sorted(name.removeprefix("base_model.model.")
                             for name, m in theirs.named_modules()
                             if isinstance(m, peft.tuners.lora.LoraLayer))
    names = lx.add_lora(model, 2, include="all-linear")
    assert sorted(names) == wrapped_by_peft and "lm_head" not in names
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))  # no output layer to leave out
    assert lx.add_lora(plain, 1, include="ALL-LINEAR") == ["0", "1"]


class _TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 8, dtype=torch.float64)
        self.body = nn.Linear(8, 8, dtype=torch.float64)
        self.head = nn.Linear(8, 12, bias=False, dtype=torch.float64)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


def test_a_tied_layer_trains_an_adapter_but_is_never_merged_into():
    model = _TiedHead()
    lx.add_lora(model, 2, include=["head", "body"])
    with torch.no_grad():
        model.head.B.normal_()
        model.body.B.normal_()
    ids = torch.randint(0, 12, (3, 4))
    expected = model(ids)
    embedding = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match="the weight of head is tied to embed.weight"):
        lx.merge_lora(model)
    # Refused before anything changed: body is not merged either.
    assert not model.body.merged and torch.equal(model.embed.weight, embedding)
    torch.testing.assert_close(model(ids), expected)
    assert torch.equal(model.embed.weight, embedding)
    # The layer alone cannot see the model: its merge() warns about the tie
    # add_lora found. Untied first, merge_lora goes ahead and leaves the
    # embedding alone.
    with torch.no_grad():
        model.head.base.weight = nn.Parameter(model.head.base.weight.clone(),
                                              requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.merge_lora(model)
    torch.testing.assert_close(model(ids), expected)
    assert torch.equal(model.embed.weight, embedding)


def test_merging_a_layer_whose_tie_add_lora_found_warns():
    model = _TiedHead()
    lx.add_lora(model, 2, include="head")
    with pytest.warns(UserWarning, match="base weight was tied to embed.weight"):
        model.head.merge()


def test_pissa_is_refused_on_a_tied_layer_before_any_change():
    model = _TiedHead()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="init='pissa' leaves the residual in the base weight, "
                                         "but the weight of head is tied to embed.weight"):
        lx.add_lora(model, 2, include=["head", "body"], init="pissa")
    assert type(model.head) is nn.Linear and type(model.body) is nn.Linear
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def _sharing_memory(how):
    """Two layers whose weights are distinct Parameters over one memory: the
    same elements, or halves of a fused weight the model also holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    if how == "same elements":
        model[1].weight = nn.Parameter(model[0].weight.data)
    else:
        model.fused = nn.Parameter(torch.randn(16, 8))
        model[0].weight = nn.Parameter(model.fused.data[:8])
        model[1].weight = nn.Parameter(model.fused.data[8:])
    return model


@pytest.mark.parametrize("how, expected", [
    ("same elements", r"the weight of 0 is tied to 1\.base\.weight; the weight of 1 is tied to "
                      r"0\.base\.weight"),
    ("halves of a fused weight", r"the weight of 0 is tied to fused; the weight of 1 is tied "
                                 r"to fused")])
def test_weights_sharing_memory_are_never_merged_into(how, expected):
    # Only the very same Parameter counted as a tie: merging one layer wrote
    # into the other's weight (or the fused one), and the merged model's
    # outputs were off by 1.3, silently.
    model = _sharing_memory(how)
    lx.add_lora(model, 2)
    with torch.no_grad():
        for layer in model:
            layer.B.normal_()
    x = torch.randn(4, 8)
    expected_outputs = model(x).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=expected):
        lx.merge_lora(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    torch.testing.assert_close(model(x), expected_outputs, rtol=0, atol=0)


def test_halves_of_one_memory_that_do_not_overlap_are_not_tied():
    # Each half's elements are its own: merging one leaves the other alone.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fused = torch.randn(16, 8)
    model[0].weight, model[1].weight = nn.Parameter(fused[:8]), nn.Parameter(fused[8:])
    lx.add_lora(model, 2)
    with torch.no_grad():
        for layer in model:
            layer.B.normal_()
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = model(x.float()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.merge_lora(model)
    torch.testing.assert_close(model(x.float()).double(), expected, rtol=1e-5, atol=1e-5)


def test_models_of_fake_tensors_are_not_taken_for_tied():
    # Every fake tensor's storage says data_ptr 0: all of a model's tensors
    # looked as if they shared one memory, and merge_lora refused them all.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        lx.add_lora(model, 2, include="0")
        lx.add_lora(model, 2, include="1", init="pissa")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model[1].merge()
            lx.merge_lora(model)
    assert all(type(layer) is nn.Linear for layer in model)


@pytest.mark.parametrize("how", ["same elements", "halves of a fused weight"])
def test_pissa_is_refused_on_a_weight_sharing_memory_before_any_change(how):
    model = _sharing_memory(how)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"init='pissa' leaves the residual in the base weight, "
                                         r"but the weight of 0 is tied to"):
        lx.add_lora(model, 2, init="pissa")
    assert all(type(layer) is nn.Linear for layer in model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize("kwargs", [{}, {"init": "pissa"}, {"use_dora": True}],
                         ids=["default", "pissa", "dora"])
def test_adapters_added_under_inference_mode_can_be_trained_and_loaded(kwargs):
    # A, B and DoRA's magnitude were inference tensors there: Parameters that
    # said they required gradients, failed in backward ("Inference tensors
    # cannot be saved for backward") and in load_state_dict.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    x = torch.randn(4, 16)
    expected = model(x).detach()
    base = nn.Linear(16, 12)
    with torch.inference_mode():
        layer = lx.LoRALinear(base, 4, **kwargs)
        lx.add_lora(model, 4, **kwargs)
    for module in (layer, model):
        trainable = [p for p in module.parameters() if p.requires_grad]
        assert trainable and not any(p.is_inference() for p in trainable)
        module(x).sum().backward()
        assert all(p.grad is not None for p in trainable)
        module.load_state_dict(module.state_dict())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["layer", "model"])
def test_pissa_on_an_inference_tensor_base_is_refused_before_any_change(how):
    # torch's copy_ wrote the residual into the base's weight, then raised
    # ("Inplace update to inference tensor outside InferenceMode"): the layer
    # was left changed and frozen, with no adapter.
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="an inference tensor"):
        if how == "layer":
            lx.LoRALinear(model[0], 4, init="pissa")
        else:
            lx.add_lora(model, 4, init="pissa")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_adapters_train_on_a_layer_built_under_inference_mode():
    # The fused op saved the base weight for backward even where no gradient
    # reads it ("Inference tensors cannot be saved for backward"), where
    # x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ in plain torch trains. (A layer whose input
    # needs a gradient needs W saved, in torch as here.)
    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(16, 12))
    lx.add_lora(model, 4, init="gaussian")
    x = torch.randn(5, 16)
    model(x).square().sum().backward()
    layer = model[0]
    W, b = (t.detach().double() for t in (layer.base.weight, layer.base.bias))
    A, B = (t.detach().double().requires_grad_() for t in (layer.A, layer.B))
    xd = x.double()
    (xd @ W.T + b + layer.scale * (xd @ A.T) @ B.T).square().sum().backward()
    torch.testing.assert_close(layer.A.grad.double(), A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.B.grad.double(), B.grad, rtol=1e-5, atol=1e-6)
