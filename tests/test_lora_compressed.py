"""LoRA on a compressed model: LoRALinear over a LowRankLinear base, add_lora on
a compress_model result, merging into the factors, saving, distilling the adapters."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx
from conftest import DTYPES
from reference import assert_close_to_reference, dense_float64_copy


def _adapter(base, rank=3, alpha=6.0, **kwargs):
    """A LoRALinear over ``base`` whose B is random, so the adapter changes the output."""
    lora = lx.LoRALinear(base, rank, alpha, **kwargs)
    with torch.no_grad():
        lora.B.normal_()
    return lora


def _reference(lora, x):
    """float64 (B₀·A₀ + scale·B·A)·x + bias, formed densely outside the ops."""
    base = lora.base
    with torch.no_grad():
        weight = base.B.double() @ base.A.double()
        weight = weight + lora.scale * (lora.B.double() @ lora.A.double())
        y = x.double() @ weight.T
        return y if base.bias is None else y + base.bias.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_the_float64_dense_reference(dtype, bias):
    base = lx.LowRankLinear(24, 20, 5, bias=bias, dtype=dtype)
    lora = _adapter(base)
    for shape in [(7, 24), (2, 3, 24), (0, 24), (24,)]:
        x = torch.randn(shape, dtype=dtype)
        assert_close_to_reference(lora(x), _reference(lora, x), dtype)


def test_gradients_reach_the_adapter_and_x_never_the_frozen_factors():
    base = lx.LowRankLinear(16, 12, 4, dtype=torch.float64)
    lora = _adapter(base, rank=2, alpha=3.0)
    assert not any(p.requires_grad for p in base.parameters())
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(5, 12, dtype=torch.float64)
    lora(x).backward(grad_out)

    # The same function written densely, differentiated by autograd.
    A, B = lora.A.detach().clone().requires_grad_(), lora.B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight = base.B.detach() @ base.A.detach() + lora.scale * (B @ A)
    (x_ref @ weight.T + base.bias.detach()).backward(grad_out)
    for got, expected in ((lora.A.grad, A.grad), (lora.B.grad, B.grad), (x.grad, x_ref.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in base.parameters())


def test_dropout_reaches_only_the_adapter_in_training():
    base = lx.LowRankLinear(16, 12, 4, dtype=torch.float64)
    lora = _adapter(base, dropout=0.5)
    x = torch.randn(64, 16, dtype=torch.float64)
    lora.train()
    torch.manual_seed(3)
    out = lora(x)
    torch.manual_seed(3)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    expected = base(x).double() + lora.scale * (mask_x @ lora.A.T @ lora.B.T)
    torch.testing.assert_close(out, expected.detach())
    lora.eval()
    torch.testing.assert_close(lora(x), _reference(lora, x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merge_appends_the_adapter_to_the_factors_and_unmerge_restores_them(dtype):
    base = lx.LowRankLinear(24, 20, 5, dtype=dtype)
    own_A, own_B, own_bias = base.A.detach().clone(), base.B.detach().clone(), base.bias.clone()
    lora = _adapter(base, rank=3)
    x = torch.randn(9, 24, dtype=dtype)
    expected = _reference(lora, x)

    assert lora.merge() is lora and lora.merged
    assert base.rank == 8 and base.A.shape == (8, 24) and base.B.shape == (20, 8)
    assert not base.A.requires_grad and not base.B.requires_grad
    assert_close_to_reference(lora(x), expected, dtype)
    assert_close_to_reference(base(x), expected, dtype)  # the base alone now holds it

    lora.unmerge()
    assert not lora.merged and base.rank == 5
    for got, own in ((base.A, own_A), (base.B, own_B), (base.bias, own_bias)):
        assert torch.equal(got, own)  # bit for bit, not B₀A₀ + sBA − sBA
    assert_close_to_reference(lora(x), expected, dtype)


def _compressed_model():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 8)).double()
    lx.compress_model(model, rank=6, include=["0", "2"], progress=False)
    return model


def test_add_lora_wraps_the_compressed_layers_and_merge_lora_keeps_them_factored():
    model = _compressed_model()
    x = torch.randn(11, 16, dtype=torch.float64)
    before = model(x)
    assert lx.add_lora(model, 2, include="all-linear") == ["0", "2", "4"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B starts at zero
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{layer}.{f}" for layer in ("0", "2", "4") for f in ("A", "B")}
    with torch.no_grad():
        for name in ("0", "2", "4"):
            model.get_submodule(name).B.normal_()
    expected = dense_float64_copy(model)(x)
    torch.testing.assert_close(model(x), expected)

    assert lx.merge_lora(model) == ["0", "2", "4"]
    assert isinstance(model[0], lx.LowRankLinear) and model[0].rank == 8
    assert isinstance(model[2], lx.LowRankLinear) and model[2].rank == 8
    assert type(model[4]) is nn.Linear
    torch.testing.assert_close(model(x), expected)


def test_training_moves_only_the_adapters_of_a_compressed_model():
    model = _compressed_model()
    lx.add_lora(model, 2, include=["0", "2"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(6, 16, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"0.A", "0.B", "2.A", "2.B"}


def test_pissa_and_bare_layers_are_refused_before_any_change():
    model = _compressed_model()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model]
    for init in ("pissa", "pissa_niter_2"):
        with pytest.raises(ValueError, match=f"init='{init}' splits a dense weight, but the "
                                             "base layer 2 is a LowRankLinear \\(rank 6\\)"):
            lx.add_lora(model, 2, include=["4", "2"], init=init)
        with pytest.raises(ValueError, match="base layer is a LowRankLinear"):
            lx.LoRALinear(model[0], 2, init=init)
    assert [type(m) for m in model] == types
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key])
    with pytest.raises(TypeError, match="itself a LowRankLinear.*LoRALinear"):
        lx.add_lora(model[0], 2)
    with pytest.raises(ValueError, match="rank must be in"):
        lx.LoRALinear(lx.LowRankLinear(4, 3, 2), 4)


def test_adapters_save_apart_from_the_compressed_model(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = _compressed_model()
    path = tmp_path / "compressed.safetensors"
    lx.save_compressed(model, path)
    lx.add_lora(model, 3, include=["0", "2"])
    with torch.no_grad():
        model[0].B.normal_()
        model[2].B.normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    expected = model(x)
    safetensors.save_file(dict(lx.lora_state_dict(model)), tmp_path / "adapter.safetensors")

    with pytest.raises(ValueError, match="holds LoRA adapters \\(0, 2\\).*merge_lora"):
        lx.save_compressed(model, tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()
    with pytest.raises(ValueError, match="0, 2 adapt a LowRankLinear.*lora_state_dict"):
        lx.save_peft_adapter(model, tmp_path / "peft")

    fresh = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 8)).double()
    lx.load_compressed(fresh, path)
    lx.add_lora(fresh, 3, include=["0", "2"])
    lx.load_lora_state_dict(fresh, safetensors.load_file(tmp_path / "adapter.safetensors"))
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)

    # Merged, the factors grow and save_compressed / load_compressed carry them.
    lx.merge_lora(model)
    lx.save_compressed(model, tmp_path / "merged.safetensors")
    again = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 8)).double()
    lx.load_compressed(again, tmp_path / "merged.safetensors")
    assert again[0].rank == 9 and again[2].rank == 9
    torch.testing.assert_close(again(x), expected)


def test_distill_trains_the_adapters_by_default_and_leaves_the_factors():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).double()
    model = copy.deepcopy(teacher)
    lx.compress_model(model, rank=3, include="0", progress=False)
    lx.add_lora(model, 4, include="0", init="gaussian")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in ("0.A", "0.B")}
    data = [torch.randn(32, 16, dtype=torch.float64) for _ in range(4)]
    result = lx.distill(model, teacher, data, steps=60, lr=1e-2, progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0]
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert model[0].A.requires_grad and not model[0].base.A.requires_grad


def test_compiled_model_matches_eager():
    model = _compressed_model()
    lx.add_lora(model, 2, include=["0", "2"])
    with torch.no_grad():
        model[0].B.normal_()
    x = torch.randn(7, 16, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("shape", [(16, 12), (12, 16)])  # d ≤ k and d > k
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_merge_past_full_rank_is_folded_to_rank_min_d_k(shape, dtype, tmp_path):
    k, d = shape
    base = lx.LowRankLinear(k, d, 6, dtype=dtype)
    own = (base.A.detach().clone(), base.B.detach().clone())
    lora = _adapter(base, rank=8)  # 6 + 8 ranks > min(d, k) = 12
    x = torch.randn(5, k, dtype=dtype)
    expected = _reference(lora, x)
    # Warned before anything changes: as an error it leaves the layer as it was
    # (it had taken the buffers that keep the base's factors).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="merged layer has rank 12"):
            lora.merge()
    assert not lora.merged and not dict(lora.named_buffers())
    with pytest.warns(UserWarning, match="merged layer has rank 12, at or past d·k/\\(d\\+k\\)"):
        lora.merge()
    assert base.rank == 12 and base.A.shape == (12, k) and base.B.shape == (d, 12)
    assert_close_to_reference(lora(x), expected, dtype)
    lora.unmerge()
    assert base.rank == 6 and torch.equal(base.A, own[0]) and torch.equal(base.B, own[1])
    assert not dict(lora.named_buffers())

    # merge_lora and save_compressed / load_compressed take the folded layer too.
    model = nn.Sequential(lx.LowRankLinear.from_factors(*own, base.bias))
    lx.add_lora(model, 8)
    with torch.no_grad():
        model[0].B.normal_()
    expected = model(x)
    with pytest.warns(UserWarning, match="at least as many numbers as a dense layer"):
        lx.merge_lora(model)
    merged = model(x)
    assert_close_to_reference(merged, expected.detach().double(), dtype)
    lx.save_compressed(model, tmp_path / "merged.safetensors")
    fresh = nn.Sequential(nn.Linear(k, d, dtype=dtype))
    lx.load_compressed(fresh, tmp_path / "merged.safetensors")
    assert fresh[0].rank == 12
    torch.testing.assert_close(fresh(x), merged, rtol=0, atol=0)


def test_a_state_dict_file_with_adapters_over_compressed_layers_is_named_so(tmp_path):
    # save_pretrained / save_file of a compressed model still holding
    # adapters: load_compressed says what the file holds and what to do.
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    lx.compress_model(model, rank=3)
    lx.add_lora(model, 2)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="holds a LoRA adapter over a compressed layer"):
        lx.load_compressed(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)), path)
