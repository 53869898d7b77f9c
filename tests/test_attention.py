"""SplitMultiheadAttention and split_attention: the same function as nn.MultiheadAttention
(the reference, run on the same weights), with projections compress_model can reach."""

import contextlib
import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import lowrank_ext as lx
from lowrank_ext.attention import SplitMultiheadAttention

E, H = 16, 4


def _pair(**options):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dtype=torch.float64, **options)
    with torch.no_grad():  # nn.MultiheadAttention zeroes its biases: make them count
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha.eval(), SplitMultiheadAttention.from_multihead_attention(mha)


def _inputs(batch_first, N=3, L=5, S=7, kdim=E, vdim=E, self_attention=False):
    def make(seq, dim):
        shape = (N, seq, dim) if batch_first else (seq, N, dim)
        return torch.randn(shape, dtype=torch.float64)
    q = make(L, E)
    if self_attention:
        return q, q, q
    return q, make(S, kdim), make(S, vdim)


OPTIONS = [dict(), dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True),
           dict(add_zero_attn=True), dict(kdim=6, vdim=10), dict(add_bias_kv=True,
                                                                add_zero_attn=True)]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding", "both", "3d"])
def test_equals_multihead_attention(options, need_weights, average, masks):
    mha, split = _pair(**options)
    batch_first = options.get("batch_first", False)
    query, key, value = _inputs(batch_first, kdim=options.get("kdim", E),
                                vdim=options.get("vdim", E))
    N, L, S = 3, 5, 7
    kwargs = dict(need_weights=need_weights, average_attn_weights=average)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -1] = True
    if masks == "bool":
        kwargs["attn_mask"] = torch.rand(L, S) > 0.7
        kwargs["attn_mask"][:, 0] = False  # every query keeps a key
    elif masks == "float":
        kwargs["attn_mask"] = torch.randn(L, S, dtype=torch.float64)
    elif masks == "padding":
        kwargs["key_padding_mask"] = padding
    elif masks == "both":
        kwargs["attn_mask"] = torch.randn(L, S, dtype=torch.float64)
        kwargs["key_padding_mask"] = padding.double().masked_fill(padding, -1e4)
    elif masks == "3d":
        kwargs["attn_mask"] = torch.randn(N * H, L, S, dtype=torch.float64)
    expected, expected_weights = mha(query, key, value, **kwargs)
    out, weights = split(query, key, value, **kwargs)
    torch.testing.assert_close(out, expected)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights)
    else:
        assert weights is None and expected_weights is None


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_inputs_and_the_causal_hint(batch_first):
    mha, split = _pair(batch_first=batch_first)
    x = torch.randn(6, E, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    for kwargs in (dict(), dict(need_weights=False, attn_mask=causal, is_causal=True),
                   dict(attn_mask=causal, is_causal=True),
                   dict(key_padding_mask=torch.tensor([False] * 5 + [True]))):
        expected, expected_weights = mha(x, x, x, **kwargs)
        out, weights = split(x, x, x, **kwargs)
        torch.testing.assert_close(out, expected)
        if expected_weights is not None:
            torch.testing.assert_close(weights, expected_weights)
    with pytest.raises(RuntimeError, match="is_causal needs attn_mask"):
        split(x, x, x, is_causal=True)


def test_gradients_equal_multihead_attention():
    mha, split = _pair(batch_first=True, add_bias_kv=True)
    mha.train()
    split.train()  # dropout is 0: training mode changes nothing else
    query, key, value = _inputs(True)
    grad = torch.randn(3, 5, E, dtype=torch.float64)
    mha(query, key, value, need_weights=False)[0].backward(grad)
    split(query, key, value, need_weights=False)[0].backward(grad)
    packed = mha.in_proj_weight.grad
    for i, layer in enumerate((split.q_proj, split.k_proj, split.v_proj)):
        torch.testing.assert_close(layer.weight.grad, packed[i * E:(i + 1) * E])
        torch.testing.assert_close(layer.bias.grad, mha.in_proj_bias.grad[i * E:(i + 1) * E])
    torch.testing.assert_close(split.out_proj.weight.grad, mha.out_proj.weight.grad)
    torch.testing.assert_close(split.bias_k.grad, mha.bias_k.grad)


def test_split_attention_in_torch_transformers_then_compress():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True,
                                       dtype=torch.float64)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True),
                          nn.TransformerDecoderLayer(E, H, 32, dropout=0.0, batch_first=True,
                                                     dtype=torch.float64)).eval()
    x = torch.randn(2, 6, E, dtype=torch.float64)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])

    def run(m):
        with torch.no_grad():
            memory = m[0](x, src_key_padding_mask=padding)
            return m[1](x, memory, tgt_is_causal=False, memory_key_padding_mask=padding)

    expected = run(model)
    names = lx.split_attention(model)
    assert names == ["0.layers.0.self_attn", "0.layers.1.self_attn", "1.self_attn",
                     "1.multihead_attn"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    torch.testing.assert_close(run(model), expected)

    report = lx.compress_model(model, ratio=0.5, include="*_proj",
                               calibration=lambda m: run(m))
    assert len(report.layers) == 16  # q, k, v, out in each of the four attentions
    assert report.ranks and report.params_after <= 0.5 * report.params_before
    assert isinstance(model[0].layers[0].self_attn.q_proj, lx.LowRankLinear)
    assert torch.isfinite(run(model)).all()


def test_save_and_load_split_themselves(tmp_path):
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, dropout=0.0,
                                                                dtype=torch.float64), 2)
    model = build().eval()
    lx.split_attention(model, include="layers.0.*")
    lx.compress_model(model, rank=4, include=["q_proj", "v_proj"])
    x = torch.randn(5, 2, E, dtype=torch.float64)
    expected = model(x)
    lx.save_compressed(model, tmp_path / "m.safetensors")
    fresh = build().eval()
    lx.load_compressed(fresh, tmp_path / "m.safetensors")
    assert isinstance(fresh.layers[0].self_attn, SplitMultiheadAttention)
    assert isinstance(fresh.layers[1].self_attn, nn.MultiheadAttention)  # stored packed
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_a_shared_module_is_split_once_and_bad_input():
    mha = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": mha, "b": mha, "other": nn.Linear(E, E)})
    assert lx.split_attention(model) == ["a"]
    assert model["a"] is model["b"]
    with pytest.raises(TypeError, match="itself an nn.MultiheadAttention"):
        lx.split_attention(nn.MultiheadAttention(E, H))
    with pytest.raises(ValueError, match="has no nn.MultiheadAttention"):
        lx.split_attention(nn.Sequential(nn.Linear(2, 2)))
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H)})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="include pattern 'nope' matches no "
                                         "nn.MultiheadAttention module"):
        lx.split_attention(model, include="nope")
    assert isinstance(model["attn"], nn.MultiheadAttention)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="mha must be an nn.MultiheadAttention"):
        SplitMultiheadAttention.from_multihead_attention(nn.Linear(2, 2))


def test_flags_dtype_and_mode_carry_over():
    mha = nn.MultiheadAttention(E, H, dropout=0.1, dtype=torch.float32).train()
    mha.in_proj_weight.requires_grad_(False)
    split = SplitMultiheadAttention.from_multihead_attention(mha)
    assert split.training and split.dropout == 0.1
    assert not split.q_proj.weight.requires_grad and split.out_proj.weight.requires_grad
    assert {p.dtype for p in split.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in split.parameters())
    compiled = torch.compile(split.eval(), fullgraph=True, backend="aot_eager")
    q, k, v = _inputs(False)
    q, k, v = (t.float() for t in (q, k, v))
    torch.testing.assert_close(compiled(q, k, v)[0], split(q, k, v)[0])


def test_compress_model_warns_about_packed_attention_and_a_failed_load_unsplits(tmp_path):
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, dtype=torch.float64), 1)
    with pytest.warns(UserWarning, match="layers.0.self_attn keep their projections packed.*"
                                         "split_attention"):
        lx.compress_model(copy.deepcopy(model), rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # layers chosen by name: no warning
        lx.compress_model(copy.deepcopy(model), rank=2, include="linear1")

    lx.split_attention(model)
    lx.compress_model(model, rank=2, include="q_proj")
    lx.save_compressed(model, tmp_path / "m.safetensors")
    wrong = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 48, dtype=torch.float64), 1)
    attention = wrong.layers[0].self_attn
    with pytest.raises(RuntimeError, match="does not fit the model"):
        lx.load_compressed(wrong, tmp_path / "m.safetensors")
    assert wrong.layers[0].self_attn is attention  # put back, packed

    with torch.device("meta"):  # built without memory, filled from the file
        empty = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32,
                                                                 dtype=torch.float64), 1)
    lx.load_compressed(empty, tmp_path / "m.safetensors", device="cpu")
    x = torch.randn(4, 2, E, dtype=torch.float64)
    torch.testing.assert_close(empty.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_mismatched_batches_empty_batches_and_autocast_weights_as_torch():
    mha, split = _pair()
    query = torch.randn(5, 4, E, dtype=torch.float64)
    key = torch.randn(6, 2, E, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        mha(query, key, key)
    with pytest.raises(RuntimeError, match="key and value hold 2 sequences, query 4"):
        split(query, key, key)

    empty_q, empty_kv = torch.randn(5, 0, E, dtype=torch.float64), torch.randn(7, 0, E,
                                                                              dtype=torch.float64)
    expected, expected_weights = mha(empty_q, empty_kv, empty_kv)
    out, weights = split(empty_q, empty_kv, empty_kv)
    assert out.shape == expected.shape == (5, 0, E)
    assert weights.shape == expected_weights.shape == (0, 5, 7)

    mha32, split32 = (m.float() for m in _pair())
    q, k, v = (t.float() for t in _inputs(False))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, -2:] = True
    for masks in (dict(), dict(key_padding_mask=padding),
                  dict(attn_mask=torch.randn(5, 7))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, expected_weights = mha32(q, k, v, **masks)
            out, weights = split32(q, k, v, **masks)
        assert weights.dtype == expected_weights.dtype == torch.bfloat16
        assert out.dtype == expected.dtype
        torch.testing.assert_close(weights.float(), expected_weights.float(), rtol=0.02,
                                   atol=0.02)
    with pytest.raises(RuntimeError):  # another mask dtype: refused by both
        mha(q.double(), k.double(), v.double(), attn_mask=torch.randn(5, 7))
    with pytest.raises(RuntimeError):
        split(q.double(), k.double(), v.double(), attn_mask=torch.randn(5, 7))


def test_the_packed_attention_warning_points_at_the_caller():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32), 1,
                                  enable_nested_tensor=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lx.compress_model(model, rank=2)
    [warning] = [w for w in caught if "packed" in str(w.message)]
    assert warning.filename == __file__


class _Doubled(nn.MultiheadAttention):
    """A subclass computing otherwise than its packed weights say."""

    def forward(self, query, key, value, **kwargs):
        out, weights = super().forward(query, key, value, **kwargs)
        return 2 * out, weights


def test_subclasses_are_left_alone():
    import torch.ao.nn.quantizable as nnq

    torch.manual_seed(0)
    quantizable = nnq.MultiheadAttention(E, H).eval()  # projects with linear_Q/K/V
    with torch.no_grad():
        for layer in (quantizable.linear_Q, quantizable.linear_K, quantizable.linear_V):
            layer.weight.normal_()
    model = nn.ModuleDict({"plain": nn.MultiheadAttention(E, H), "doubled": _Doubled(E, H),
                           "quantizable": quantizable})
    x = torch.randn(5, 2, E)
    expected = {name: model[name](x, x, x)[0] for name in ("doubled", "quantizable")}
    kept = {name: model[name] for name in expected}
    assert lx.split_attention(model) == ["plain"]
    assert isinstance(model["plain"], SplitMultiheadAttention)
    for name, out in expected.items():
        assert model[name] is kept[name]
        torch.testing.assert_close(model[name](x, x, x)[0], out, rtol=0, atol=0)

    with pytest.raises(TypeError, match=r"'doubled' matches only layers left alone: doubled "
                                        r"\(_Doubled, a subclass of nn.MultiheadAttention"):
        lx.split_attention(nn.ModuleDict({"a": nn.MultiheadAttention(E, H),
                                          "doubled": _Doubled(E, H)}), include="doubled")
    with pytest.raises(ValueError, match=r"no nn.MultiheadAttention module to split \(left "
                                         r"alone: attn \(_Doubled, a subclass"):
        lx.split_attention(nn.ModuleDict({"attn": _Doubled(E, H)}))
    with pytest.raises(TypeError, match="not a subclass.*got _Doubled"):
        SplitMultiheadAttention.from_multihead_attention(_Doubled(E, H))


class _FullyTied(nn.Module):
    """Two attention modules sharing every tensor (ALBERT-style), then a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
        self.b = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
        self.b.in_proj_weight, self.b.in_proj_bias = self.a.in_proj_weight, self.a.in_proj_bias
        self.b.out_proj = self.a.out_proj
        self.head = nn.Linear(E, E, dtype=torch.float64)

    def forward(self, x):
        x = self.a(x, x, x, need_weights=False)[0]
        return self.head(self.b(x, x, x, need_weights=False)[0])


def test_fully_tied_split_modules_load_back_tied(tmp_path):
    # The file stores each shared tensor once, under a's names only: b, with
    # no keys of its own, must be split with a on loading.
    model = _FullyTied().eval()
    lx.split_attention(model)
    lx.compress_model(model, ratio=0.5, calibration=[torch.randn(4, 5, E, dtype=torch.float64)],
                      progress=False)
    lx.save_compressed(model, tmp_path / "m.safetensors")
    fresh = _FullyTied().eval()
    lx.load_compressed(fresh, tmp_path / "m.safetensors")
    assert fresh.a.q_proj.weight is fresh.b.q_proj.weight
    assert fresh.a.out_proj.weight is fresh.b.out_proj.weight
    x = torch.randn(2, 5, E, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_tied_attention_modules_stay_tied():
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        model = nn.ModuleDict({"a": nn.MultiheadAttention(E, H, dtype=torch.float64),
                               "b": nn.MultiheadAttention(E, H, dtype=torch.float64)})
        model["b"].in_proj_weight = model["a"].in_proj_weight  # ALBERT-style sharing
        model["b"].out_proj.weight = model["a"].out_proj.weight
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=0.3)
        return model

    def step(model, x):
        # Through both modules: the shared tensors get the sum of two gradients.
        model.zero_grad()
        (model["a"](x, x, x)[0].square().sum() + model["b"](x, x, x)[0].sum()).backward()
        with torch.no_grad():  # an SGD step, each shared tensor once
            for p in model.parameters():
                p -= 0.01 * p.grad
            return [model[n](x, x, x)[0] for n in ("a", "b")]

    x = torch.randn(5, 2, E, dtype=torch.float64)
    reference, model = build(), build()
    before = sum(p.numel() for p in model.parameters())
    assert lx.split_attention(model) == ["a", "b"]
    a, b = model["a"], model["b"]
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert getattr(a, name).weight is getattr(b, name).weight
        assert getattr(a, name).bias is not getattr(b, name).bias  # not tied before either
    assert sum(p.numel() for p in model.parameters()) == before
    for out, expected in zip(step(model, x), step(reference, x)):
        torch.testing.assert_close(out, expected)
    assert torch.equal(a.q_proj.weight, b.q_proj.weight)

    model = build()
    with pytest.raises(ValueError, match="a.in_proj_weight is tied to b.in_proj_weight, which "
                                         "is not split with it"):
        lx.split_attention(model, exclude="b")
    assert type(model["a"]) is nn.MultiheadAttention  # nothing replaced


def test_nested_tensor_input_as_torch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True,
                                       dtype=torch.float64)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    sequences = [torch.randn(n, E, dtype=torch.float64) for n in (5, 3, 1)]
    nested = torch.nested.nested_tensor(sequences)
    split = copy.deepcopy(encoder)
    lx.split_attention(split)
    with torch.no_grad():
        expected, out = encoder(nested), split(nested)
        assert out.is_nested
        for o, e in zip(out.unbind(), expected.unbind(), strict=True):
            torch.testing.assert_close(o, e)

        mha, split = _pair(batch_first=True)
        for average in (True, False):
            expected, expected_weights = mha(nested, nested, nested,
                                             average_attn_weights=average)
            out, weights = split(nested, nested, nested, average_attn_weights=average)
            for o, e in zip(out.unbind(), expected.unbind(), strict=True):
                torch.testing.assert_close(o, e)
            torch.testing.assert_close(weights, expected_weights)  # zeros where padded

        plain = torch.randn(3, 5, E, dtype=torch.float64)
        for args, kwargs, message in (
                ((nested, plain, plain), {}, "only taken for self-attention"),
                ((nested,) * 3, dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.bool)),
                 "takes no key_padding_mask")):
            with pytest.raises(RuntimeError, match=message):
                split(*args, **kwargs)
        with pytest.raises(RuntimeError, match="needs batch_first=True"):
            _pair()[1](nested, nested, nested)


def test_bias_presence_mirrors_the_source():
    torch.manual_seed(0)
    without_out_bias = nn.MultiheadAttention(E, H, dtype=torch.float64)
    without_out_bias.out_proj.bias = None
    only_out_bias = nn.MultiheadAttention(E, H, bias=False, dtype=torch.float64)
    only_out_bias.out_proj.bias = nn.Parameter(torch.randn(E, dtype=torch.float64))
    x = torch.randn(5, 2, E, dtype=torch.float64)
    for mha in (without_out_bias, only_out_bias):
        with torch.no_grad():
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.normal_()
        split = SplitMultiheadAttention.from_multihead_attention(mha)
        assert not any(p.is_meta for p in split.parameters())
        for layer in (split.q_proj, split.k_proj, split.v_proj):
            assert (layer.bias is None) == (mha.in_proj_bias is None)
        assert (split.out_proj.bias is None) == (mha.out_proj.bias is None)
        torch.testing.assert_close(split(x, x, x)[0], mha(x, x, x)[0])


def test_key_and_value_feature_sizes_are_checked():
    mha, split = _pair(kdim=6, vdim=10)
    query = torch.randn(5, 2, E, dtype=torch.float64)
    key, value = torch.randn(7, 2, 6, dtype=torch.float64), torch.randn(7, 2, 10,
                                                                        dtype=torch.float64)
    wrong = torch.randn(7, 2, 8, dtype=torch.float64)
    for k, v in ((wrong, value), (key, wrong)):
        with pytest.raises((AssertionError, RuntimeError)):  # torch refuses them too
            mha(query, k, v)
    with pytest.raises(RuntimeError, match=r"expected key feature size \(kdim\) 6, got 8"):
        split(query, wrong, value)
    with pytest.raises(RuntimeError, match=r"expected value feature size \(vdim\) 10, got 8"):
        split(query, key, wrong)


def test_projections_of_one_tensor_see_one_tensor():
    """Calibration shares one XᵀX between layers fed the same tensor."""
    mha, split = _pair()  # sequence first: the inputs are transposed
    seen = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(split, name).register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, args[0]))
    x, memory = (torch.randn(5, 2, E, dtype=torch.float64) for _ in range(2))
    for one in (x, x[:, 0]):  # batched, unbatched
        split(one, one, one)
        assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    split(x, memory, memory)  # cross-attention: keys and values from one tensor
    assert seen["k_proj"] is seen["v_proj"] and seen["q_proj"] is not seen["k_proj"]
    torch.testing.assert_close(split(x, memory, memory)[0], mha(x, memory, memory)[0])

    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 32, dropout=0.0), 1,
                                  enable_nested_tensor=False).eval()
    lx.split_attention(model)
    batch, runs = torch.randn(5, 2, E), []
    lx.compress_model(model, rank=4, include="*_proj", sequential=True,
                      calibration=lambda m: runs.append(m(batch)))
    assert len(runs) == 2  # q, k and v together, then out_proj


def test_a_root_split_file_loads_into_a_split_module(tmp_path):
    torch.manual_seed(0)
    split = SplitMultiheadAttention.from_multihead_attention(nn.MultiheadAttention(E, H))
    lx.compress_model(split, rank=2, include="q_proj")
    lx.save_compressed(split, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"the model is an nn.MultiheadAttention.*load into "
                                         r"SplitMultiheadAttention.from_multihead_attention"):
        lx.load_compressed(nn.MultiheadAttention(E, H), tmp_path / "m.safetensors")
    fresh = SplitMultiheadAttention.from_multihead_attention(nn.MultiheadAttention(E, H))
    lx.load_compressed(fresh, tmp_path / "m.safetensors")
    x = torch.randn(5, 2, E)
    torch.testing.assert_close(fresh(x, x, x)[0], split(x, x, x)[0], rtol=0, atol=0)


# --- edges found in review ---------------------------------------------------

def test_an_encoder_whose_first_attention_was_split_alone_still_runs():
    # nn.TransformerEncoder reads its first layer's in_proj_weight to decide
    # whether to pack a padded batch; splitting that layer without the encoder
    # above it (split_attention(layer), or from_multihead_attention by hand)
    # left no such attribute.
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True,
                                   dtype=torch.float64), 2).eval()
    x = torch.randn(2, 5, E, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=padding)
    assert lx.split_attention(encoder.layers[0]) == ["self_attn"]
    attention = encoder.layers[0].self_attn
    assert attention.in_proj_weight is attention.q_proj.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's nested-tensor prototype notice
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                out = encoder(x, src_key_padding_mask=padding)
            torch.testing.assert_close(out[~padding], expected[~padding])


def test_modules_torch_compile_wraps_alone_are_left_alone():
    # The compiled wrapper calls the module it was given: a split (or a
    # LowRankLinear) put in its _orig_mod's place never ran, silently.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H)
            self.head = nn.Linear(E, E)
            self.tail = nn.Linear(E, E)

        def forward(self, x):
            return self.tail(self.head(self.attn(x, x, x, need_weights=False)[0]))

    block = Block()
    block.attn = torch.compile(block.attn, backend="eager")
    block.head = torch.compile(block.head, backend="eager")
    with pytest.raises(ValueError, match=r"no nn.MultiheadAttention module to split \(left "
                                         r"alone: attn._orig_mod \(torch.compile wraps"):
        lx.split_attention(block)
    with pytest.raises(TypeError, match=r"matches only layers left alone: head._orig_mod "
                                        r"\(torch.compile wraps this module on its own"):
        lx.compress_model(block, rank=2, include="head*", progress=False)
    with pytest.raises(TypeError, match="matches only layers left alone: head._orig_mod"):
        lx.add_lora(block, 2, include="head*")
    assert type(block.head._orig_mod) is nn.Linear
    # The last guard, where a caller missed them.
    from lowrank_ext._modules import replace_module
    with pytest.raises(RuntimeError, match="cannot replace head._orig_mod: torch.compile"):
        replace_module(block, "head._orig_mod", lx.LowRankLinear(E, E, 2))
    assert type(block.head._orig_mod) is nn.Linear
    # A compiled model is split in the module it compiled, which its forward calls.
    compiled = torch.compile(Block(), backend="eager")
    assert lx.split_attention(compiled) == ["attn"]
    assert isinstance(compiled._orig_mod.attn, SplitMultiheadAttention)
    with pytest.raises(TypeError, match="is itself an nn.MultiheadAttention"):
        lx.split_attention(torch.compile(nn.MultiheadAttention(E, H), backend="eager"))


def test_a_shared_module_is_selected_by_any_of_its_names():
    mha = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": mha, "b": mha})
    assert lx.split_attention(model, include="b") == ["a"]
    assert isinstance(model["b"], SplitMultiheadAttention) and model["a"] is model["b"]
    mha = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": mha, "b": mha})
    with pytest.raises(ValueError, match="leave no nn.MultiheadAttention module selected"):
        lx.split_attention(model, exclude="b")
    assert model["a"] is mha and model["b"] is mha


def test_a_parametrized_attention_is_refused():
    from torch.nn.utils.parametrizations import orthogonal

    model = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H)})
    orthogonal(model["attn"].out_proj)
    message = (r"attn has parametrized tensors \(out_proj.weight; torch.nn.utils.parametrize\), "
               "which split layers would hold as fixed values")
    with pytest.raises(TypeError, match="split_attention: " + message):
        lx.split_attention(model)
    with pytest.raises(TypeError, match="from_multihead_attention: mha has parametrized"):
        SplitMultiheadAttention.from_multihead_attention(model["attn"])
    assert type(model["attn"]) is nn.MultiheadAttention


def test_an_interrupted_split_leaves_the_model_as_it_was(interrupt_swap):
    model = nn.ModuleDict({"a": nn.MultiheadAttention(E, H), "b": nn.MultiheadAttention(E, H)})
    before = dict(model.items())
    handle = model["a"].register_forward_hook(lambda *args: None)
    calls = interrupt_swap(2)
    with pytest.raises(KeyboardInterrupt):
        lx.split_attention(model)
    assert calls == ["a", "b"]
    assert dict(model.items()) == before and len(model["a"]._forward_hooks) == 1
    handle.remove()
    assert not model["a"]._forward_hooks


def test_bad_inputs_are_errors_naming_them():
    attention = SplitMultiheadAttention(E, H)
    x = torch.randn(5, 2, E)
    with pytest.raises(TypeError, match="SplitMultiheadAttention: query must be a Tensor, got list"):
        attention([1.0], x, x)
    with pytest.raises(TypeError, match="attn_mask must be a Tensor or None, got bool"):
        attention(x, x, x, attn_mask=True)
    with pytest.raises(RuntimeError, match="SplitMultiheadAttention: query should be unbatched "
                                           "2D or batched 3D tensor but received 4-D"):
        attention(x[None], x[None], x[None])
    with pytest.raises(RuntimeError, match="only bool and floating types of key_padding_mask"):
        attention(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))


def test_splitting_a_split_model_again_says_so():
    model = nn.ModuleDict({"a": nn.MultiheadAttention(E, H)})
    lx.split_attention(model)
    with pytest.raises(ValueError, match="no nn.MultiheadAttention module; its attention is "
                                         "split already: a"):
        lx.split_attention(model)


def test_a_frozen_encoder_whose_first_layer_was_split_alone_runs_with_gradients_on():
    """torch's encoder asks its first layer's in_proj_weight, then in_proj_bias
    (None once split), whether they require grad: frozen, it reached None."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # enable_nested_tensor's note
        encoder = nn.TransformerEncoder(layer, 2).eval()
    encoder.requires_grad_(False)
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    expected = encoder(x, src_key_padding_mask=pad)
    assert lx.split_attention(encoder.layers[0]) == ["self_attn"]
    got = encoder(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], expected[~pad], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, src_key_padding_mask=pad)[~pad], expected[~pad],
                                   rtol=1e-5, atol=1e-5)
    split = encoder.layers[0].self_attn
    split.requires_grad_(True)
    assert split.in_proj_weight is split.q_proj.weight


class _OneModuleTwoNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.z = nn.MultiheadAttention(8, 2)
        self.a = self.z  # stored under "a", the first name in sorted order

    def forward(self, x):
        return self.z(x, x, x)[0]


def test_load_compressed_splits_a_module_stored_under_its_other_name(tmp_path):
    torch.manual_seed(0)
    model = _OneModuleTwoNames()
    lx.split_attention(model)
    x = torch.randn(3, 2, 8)
    expected = model(x)
    lx.save_compressed(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    fresh = _OneModuleTwoNames()
    lx.load_compressed(fresh, tmp_path / "model.safetensors")
    assert isinstance(fresh.z, SplitMultiheadAttention) and fresh.z is fresh.a
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_an_attention_module_with_a_pruning_hook_is_refused():
    """The split layers held the pruned values as plain tensors; the mask left
    the state dict and training regrew the pruned weights."""

    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    prune.l1_unstructured(model[0], "in_proj_weight", amount=0.5)
    keys = set(model.state_dict())
    with pytest.raises(TypeError, match=r"split_attention: 0 cannot be split: in_proj_weight is "
                                        r"set anew before every call by torch's L1Unstructured"):
        lx.split_attention(model)
    assert type(model[0]).__name__ == "MultiheadAttention" and set(model.state_dict()) == keys
    with pytest.raises(TypeError, match="cannot be split: in_proj_weight is set anew"):
        SplitMultiheadAttention.from_multihead_attention(model[0])


class _TimesTwo(nn.Module):
    def forward(self, t):
        return 2 * t


def test_a_parametrized_attention_module_is_refused_naming_the_parametrization():
    """It was refused as a subclass of nn.MultiheadAttention (which torch makes
    it), with advice that did not apply."""
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    parametrize.register_parametrization(model[0], "in_proj_weight", _TimesTwo())
    with pytest.raises(TypeError, match=r"0 has parametrized tensors \(in_proj_weight; "
                                        r"torch.nn.utils.parametrize\)"):
        lx.split_attention(model)
    with pytest.raises(TypeError, match=r"mha has parametrized tensors \(in_proj_weight"):
        SplitMultiheadAttention.from_multihead_attention(model[0])


@pytest.mark.parametrize("options", [dict(), dict(kdim=32, vdim=24), dict(bias=False),
                                     dict(add_bias_kv=True), dict(kdim=32, add_bias_kv=True)])
def test_a_new_module_draws_torch_s_weights_from_the_same_seed(options):
    # The same draws in the same order as nn.MultiheadAttention: its weights,
    # and the random stream left where torch leaves it (the projections drew
    # nn.Linear's weights first, then were overwritten: another stream).
    E = 64
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, 4, **options)
    after_reference = torch.rand(3)
    torch.manual_seed(0)
    split = SplitMultiheadAttention(E, 4, **options)
    after_split = torch.rand(3)
    assert torch.equal(after_split, after_reference)
    expected = SplitMultiheadAttention.from_multihead_attention(reference).state_dict()
    assert split.state_dict().keys() == expected.keys()
    for name, tensor in split.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    if options.get("bias", True):
        assert not split.q_proj.bias.any() and not split.out_proj.bias.any()
    with torch.device("meta"):  # a default-device context places every layer
        on_meta = SplitMultiheadAttention(E, 4, **options)
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_outputs_are_laid_out_as_torch_s(batch_first, need_weights):
    # (L, N, E) in memory, a transposed view where batch_first, as torch's:
    # code after the layer may view() it, and a dropout after it draws its
    # mask in memory order (a split Transformer layer trained with other
    # masks from the same seed).
    mha, split = _pair(batch_first=batch_first)
    x, _, _ = _inputs(batch_first)
    expected, _ = mha(x, x, x, need_weights=need_weights)
    out, _ = split(x, x, x, need_weights=need_weights)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected)
    if not batch_first:
        out.view(-1, E)
    unbatched, _ = split(x[0], x[0], x[0], need_weights=need_weights)
    assert unbatched.is_contiguous()
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.5, batch_first=batch_first,
                                       dtype=torch.float64)
    reference = copy.deepcopy(layer)
    lx.split_attention(layer)
    torch.manual_seed(1)
    expected = reference(x)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("heads", [2, 3])
@pytest.mark.parametrize("need_weights", [False, True])
def test_outputs_in_inference_are_laid_out_as_torch_s_fused_path(heads, need_weights):
    # Self-attention, batch first, in eval mode with nothing requiring grad:
    # torch's fused kernel returns a contiguous (N, L, E) output, which code
    # may view() (the split module returned the transposed view of its slow path).
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E - E % heads, heads, batch_first=True,
                                dtype=torch.float64).eval()
    split = SplitMultiheadAttention.from_multihead_attention(mha)
    x = torch.randn(3, 5, mha.embed_dim, dtype=torch.float64)
    cases = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
             "grad on": contextlib.nullcontext}
    for name, context in cases.items():
        for training in (False, True):
            mha.train(training)
            split.train(training)
            with context():
                expected, _ = mha(x, x, x, need_weights=need_weights)
                out, _ = split(x, x, x, need_weights=need_weights)
                other_key, _ = split(x, x.clone(), x, need_weights=need_weights)
            assert out.stride() == expected.stride(), (name, training)
            if not training:
                torch.testing.assert_close(out, expected)
            assert not other_key.is_contiguous()  # not self-attention: torch's slow path
    fused = heads % 2 == 0  # torch's fused kernel takes an even number of heads
    with torch.no_grad():
        assert split.eval()(x, x, x)[0].is_contiguous() == fused
    # Boolean masks go through the fused kernel, floating-point ones do not
    # (a causal mask as generate_square_subsequent_mask makes it, a padding
    # mask a TransformerEncoderLayer has turned into floats).
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 5])
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    masks = [dict(key_padding_mask=padding), dict(attn_mask=causal.isinf()),
             dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.float64).masked_fill(
                 padding, -math.inf)),
             dict(attn_mask=causal), dict(attn_mask=causal, is_causal=True)]
    mha.eval()
    for mask in masks:
        with torch.no_grad():
            expected, _ = mha(x, x, x, need_weights=need_weights, **mask)
            out, _ = split(x, x, x, need_weights=need_weights, **mask)
        assert out.stride() == expected.stride(), mask


def test_an_integer_mask_is_refused_with_the_causal_hint_too():
    # Dropped for the fused causal kernel before it was checked: accepted
    # where torch refuses it.
    mha, split = _pair()
    x, _, _ = _inputs(False)
    mask = torch.ones(5, 5, dtype=torch.int64).triu(1)
    for need_weights in (False, True):
        with pytest.raises(AssertionError, match="only bool and floating types of attn_mask"):
            mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)
        with pytest.raises(RuntimeError, match="only bool and floating types of attn_mask"):
            split(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)


def test_a_module_compiled_alone_is_named_by_its_wrapper_s_name():
    # Its name in the model is "c._orig_mod": the pattern "c" said it matched
    # nothing (listing no c) instead of why c is left alone.
    model = nn.ModuleDict({"a": nn.MultiheadAttention(E, H), "c": nn.MultiheadAttention(E, H),
                           "fc": nn.Linear(E, E), "out": nn.Linear(E, E)})
    model["c"] = torch.compile(model["c"], backend="eager")
    model["fc"] = torch.compile(model["fc"], backend="eager")
    with pytest.raises(TypeError, match=r"include pattern 'c' matches only layers left alone: "
                                        r"c._orig_mod \(torch.compile wraps"):
        lx.split_attention(model, include="c")
    with pytest.raises(TypeError, match="include pattern 'fc' matches only layers left alone"):
        lx.compress_model(model, rank=2, include="fc", progress=False)
    with pytest.raises(TypeError, match="include pattern 'fc' matches only layers left alone"):
        lx.add_lora(model, 2, include="fc")
    assert lx.split_attention(model, exclude="c") == ["a"]
    with pytest.warns(UserWarning, match="c._orig_mod keep their projections packed"):
        lx.compress_model(model, rank=2, exclude="fc", progress=False)
    assert type(model["out"]) is lx.LowRankLinear
    assert type(model["fc"]._orig_mod) is nn.Linear


def test_splitting_under_inference_mode_leaves_a_trainable_module():
    # The copies were made as inference tensors there (out_proj's too, a
    # normal Parameter before): the split model could never be trained.
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0,
                                                               batch_first=True), 1,
                                    enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    expected = encoder(x)
    with torch.inference_mode():
        lx.split_attention(encoder)
        split = lx.SplitMultiheadAttention.from_multihead_attention(
            nn.MultiheadAttention(16, 4, batch_first=True))
    for module in (encoder, split):
        assert not any(p.is_inference() for p in module.parameters())
    torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-6)
    encoder(x).sum().backward()
    assert encoder.layers[0].self_attn.q_proj.weight.grad is not None


def test_attention_with_a_forward_set_on_the_instance_is_left_alone(tmp_path):
    # accelerate's hooks (device_map, offloading) set one; the split module
    # in its place never ran it.
    torch.manual_seed(0)
    model = nn.ModuleDict({"plain": nn.MultiheadAttention(E, H),
                           "hooked": nn.MultiheadAttention(E, H)})
    original = model["hooked"].forward
    model["hooked"].forward = lambda *args, **kwargs: (original(*args, **kwargs)[0] * 10, None)
    x = torch.randn(5, 2, E)
    expected = model["hooked"](x, x, x)[0]
    hooked = model["hooked"]
    assert lx.split_attention(model) == ["plain"]
    assert model["hooked"] is hooked
    torch.testing.assert_close(model["hooked"](x, x, x)[0], expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"'hooked' matches only layers left alone: hooked "
                                        r"\(an nn.MultiheadAttention with a forward set on the "
                                        r"instance"):
        lx.split_attention(nn.ModuleDict({"a": nn.MultiheadAttention(E, H), "hooked": hooked}),
                           include="hooked")
    with pytest.raises(TypeError, match="mha is an nn.MultiheadAttention with a forward set"):
        SplitMultiheadAttention.from_multihead_attention(hooked)
    # A file holding it split does not load into it.
    split = nn.ModuleDict({"hooked": nn.MultiheadAttention(E, H)})
    lx.split_attention(split)
    lx.save_compressed(split, tmp_path / "split.safetensors")
    target = nn.ModuleDict({"hooked": hooked})
    before = {name: value.clone() for name, value in target.state_dict().items()}
    with pytest.raises(ValueError, match="the file holds hooked split, but the model's is an "
                                         "nn.MultiheadAttention with a forward set"):
        lx.load_compressed(target, tmp_path / "split.safetensors")
    assert target["hooked"] is hooked
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), name
