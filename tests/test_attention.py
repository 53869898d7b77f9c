"""SplitMultiheadAttention and split_attention: the same function as nn.MultiheadAttention
(the reference, run on the same weights), with projections compress_model can reach."""

import copy
import warnings

import pytest
import torch
from torch import nn

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
