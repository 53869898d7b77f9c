"""compress_model, add_lora, merge_lora and load_compressed on torch's own
nn.TransformerEncoder / nn.TransformerEncoderLayer.

In inference those modules take fused fast paths that read their Linear
layers' weights instead of calling them (and pack padded batches into nested
tensors). Swapped-in layers must keep them off: a LowRankLinear has no dense
weight, and a LoRALinear's adapter would be silently dropped.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx
from reference import dense_float64_copy


def _encoder(layers=2, norm_first=False):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor with norm_first
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        return nn.TransformerEncoder(layer, layers).eval()


def _inputs():
    torch.manual_seed(1)
    x = torch.randn(3, 6, 32)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True  # padding at the end, as the nested-tensor path needs
    mask[1, 5:] = True
    return x, mask


def _run(model, x, mask, fast_path=True):
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fast_path)
    try:
        with torch.no_grad():
            out = model(x.to(next(model.parameters()).dtype), src_key_padding_mask=mask)
    finally:
        torch.backends.mha.set_fastpath_enabled(old)
    return out.masked_fill(mask[..., None], 0.0)  # padded positions carry no meaning


def _check_against_reference(model, x, mask):
    want = _run(dense_float64_copy(model), x, mask, fast_path=False)
    for with_mask in (mask, None):
        m = mask if with_mask is not None else torch.zeros_like(mask)
        got = _run(model, x, m)
        ref = want if with_mask is not None else _run(dense_float64_copy(model), x, m, fast_path=False)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_compressed_encoder_runs_in_inference(norm_first):
    model = _encoder(norm_first=norm_first)
    x, mask = _inputs()
    original = _run(model, x, mask)
    report = lx.compress_model(model, ratio=0.6, progress=False)
    assert report.ranks and all(isinstance(model.get_submodule(n), lx.LowRankLinear)
                                for n in report.ranks)
    # The attention output projections (a Linear subclass the attention reads
    # directly) stay dense.
    assert type(model.layers[0].self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    _check_against_reference(model, x, mask)
    assert not torch.equal(_run(model, x, mask), original)


def test_lora_encoder_keeps_its_adapter_in_inference():
    model = _encoder()
    x, mask = _inputs()
    base = _run(model, x, mask)
    names = lx.add_lora(model, 4)
    assert sorted(names) == sorted(f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2))
    torch.testing.assert_close(_run(model, x, mask), base)  # B = 0: the base model
    for module in model.modules():
        if isinstance(module, lx.LoRALinear):
            with torch.no_grad():
                module.B.normal_()
    got = _run(model, x, mask)
    assert (got - base).abs().max() > 0.1  # the adapter is not dropped
    _check_against_reference(model, x, mask)
    # Merged into plain Linear layers again, the fast path returns, same outputs.
    lx.merge_lora(model)
    assert type(model.layers[0].linear1) is nn.Linear
    assert not model.layers[0].linear1._forward_pre_hooks
    torch.testing.assert_close(_run(model, x, mask), got, rtol=1e-4, atol=1e-5)


def test_loaded_compressed_encoder_runs_in_inference(tmp_path):
    model = _encoder()
    x, mask = _inputs()
    lx.compress_model(model, ratio=0.5, progress=False)
    path = tmp_path / "encoder.safetensors"
    lx.save_compressed(model, path)
    fresh = _encoder()
    lx.load_compressed(fresh, path)
    torch.testing.assert_close(_run(fresh, x, mask), _run(model, x, mask))
    _check_against_reference(fresh, x, mask)


def test_training_mode_and_gradients_unchanged():
    model = _encoder().train()
    lx.add_lora(model, 2)
    x, mask = _inputs()
    loss = model(x, src_key_padding_mask=mask).masked_fill(mask[..., None], 0).square().sum()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    assert len(grads) == 8 and all(g is not None for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if n.endswith("base.weight"))


def test_hook_is_added_once_and_survives_deepcopy_and_pickle(tmp_path):
    model = _encoder(layers=1)
    lx.compress_model(model, rank=4, progress=False)
    layer = model.layers[0].linear1
    assert len(layer._forward_pre_hooks) == 1
    copied = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    x, mask = _inputs()
    for other in (copied, loaded):
        torch.testing.assert_close(_run(other, x, mask), _run(model, x, mask))


def _nested_flags(model):
    return [m.use_nested_tensor for m in model.modules() if isinstance(m, nn.TransformerEncoder)]


def test_failed_calls_leave_the_encoder_flag_as_it_was(tmp_path):
    model = _encoder()
    assert _nested_flags(model) == [True]
    x, mask = _inputs()
    calls = []

    def calibration(m):
        # 1: input statistics, 2: the reference outputs, 3 and 4: the
        # sensitivity probes of the first two layers (a LowRankLinear in place).
        calls.append(1)
        if len(calls) == 4:
            assert any(isinstance(l, lx.LowRankLinear) for l in m.modules())
            raise RuntimeError("calibration failed")
        m(x, src_key_padding_mask=mask)

    with pytest.raises(RuntimeError, match="calibration failed"):
        lx.compress_model(model, ratio=0.5, calibration=calibration, progress=False)
    assert len(calls) == 4
    assert _nested_flags(model) == [True]
    assert all(type(m) is not lx.LowRankLinear for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())

    other = _encoder()
    lx.compress_model(other, ratio=0.5, progress=False)
    path = tmp_path / "encoder.safetensors"
    lx.save_compressed(other, path)
    wrong = _encoder()
    wrong.layers[1].linear2 = nn.Linear(64, 16)  # the file does not fit this model
    with pytest.raises((ValueError, RuntimeError)):
        lx.load_compressed(wrong, path)
    assert _nested_flags(wrong) == [True]
    assert all(type(m) is not lx.LowRankLinear for m in wrong.modules())


def test_calibrated_compression_with_padded_batches():
    # Every calibration run (statistics, reference, probes) takes the encoder's
    # unpacked path; afterwards the encoder keeps it, since compressed layers
    # stay below it.
    model = _encoder()
    x, mask = _inputs()
    report = lx.compress_model(model, ratio=0.6, progress=False,
                               calibration=lambda m: m(x, src_key_padding_mask=mask))
    assert report.calibrated and len(report.ranks) == 4
    assert _nested_flags(model) == [False]
    _check_against_reference(model, x, mask)


def test_layer_inputs_packed_as_nested_tensors_are_calibrated_without_padding():
    # Calibrating through the packed path (as a model whose encoder still packs
    # would): the statistics hold the sequences' rows, no padding rows.
    from lowrank_ext.calibration import collect_input_grams

    model = _encoder()
    x, mask = _inputs()
    layer = {"layers.0.linear1": model.layers[0].linear1}
    packed = collect_input_grams(model, layer, lambda m: m(x, src_key_padding_mask=mask))
    # The same rows, gathered by hand: layer 0's input to linear1 is the
    # post-attention normed activations of the tokens that are not padding.
    rows = []
    hook = model.layers[0].linear1.register_forward_pre_hook(
        lambda mod, args: rows.append(args[0].detach()))
    with torch.no_grad():  # as the calibration runs (with gradients the encoder never packs)
        model(x, src_key_padding_mask=mask)
    hook.remove()
    (seen,) = rows
    assert seen.is_nested
    tokens = torch.cat([s.reshape(-1, 32) for s in seen.unbind()]).double()
    assert tokens.shape[0] == int((~mask).sum())
    torch.testing.assert_close(packed["layers.0.linear1"], tokens.T @ tokens)


def test_layers_placed_by_hand_keep_the_fused_paths_off():
    # A LowRankLinear assigned directly (no compress_model): its weight, a
    # placeholder tensor with __torch_function__, keeps the layer and the
    # encoder off their fused paths by itself.
    model = _encoder()
    for layer in model.layers:
        layer.linear1 = lx.LowRankLinear.from_linear(layer.linear1, rank=6)
        layer.linear2 = lx.LowRankLinear.from_linear(layer.linear2, rank=6)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert _nested_flags(model) == [True]
    x, mask = _inputs()
    _check_against_reference(model, x, mask)
