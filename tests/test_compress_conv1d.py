"""compress_model and load_compressed on transformers' Conv1D layers (GPT-2's linear layers)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
Conv1D = pytorch_utils.Conv1D


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = Conv1D(24, 16)  # y = x·W + b, W (16, 24)
        self.out = nn.Linear(24, 8)
        self.double()

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)))


def test_plain_svd_of_the_transposed_weight():
    model = ConvNet()
    W = model.proj.weight.detach().T.clone()  # as an (out, in) matrix
    bias = model.proj.bias.detach().clone()
    report = lx.compress_model(model, rank=3, include="proj")
    layer = model.proj
    assert isinstance(layer, lx.LowRankLinear)
    assert (layer.in_features, layer.out_features, layer.rank) == (16, 24, 3)
    assert report.layers[0].shape == (24, 16)
    U, S, Vh = torch.linalg.svd(W)
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(layer.B @ layer.A, best)
    torch.testing.assert_close(layer.bias, bias)
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ best.T + bias)
    expected_error = torch.linalg.matrix_norm(W - best) / torch.linalg.matrix_norm(W)
    assert report.layers[0].weight_error == pytest.approx(float(expected_error))


def test_calibrated_truncation_sees_the_conv1d_inputs():
    model = ConvNet()
    W = model.proj.weight.detach().T.clone()
    x = torch.randn(200, 16, dtype=torch.float64) * torch.linspace(0.1, 3.0, 16,
                                                                   dtype=torch.float64)
    report = lx.compress_model(model, rank=4, include="proj", calibration=[x])
    # The best rank-4 map in the metric of the inputs: project W·R onto its
    # leading left singular vectors, with R·Rᵀ = XᵀX.
    lam, Q = torch.linalg.eigh(x.T @ x)
    U = torch.linalg.svd(W @ (Q * lam.sqrt()))[0][:, :4]
    best = U @ U.T @ W
    torch.testing.assert_close(model.proj.B @ model.proj.A, best)
    expected = torch.linalg.matrix_norm((W - best) @ x.T) / torch.linalg.matrix_norm(W @ x.T)
    assert report.layers[0].output_error == pytest.approx(float(expected))


def test_gpt2_compresses_saves_and_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 60, (3, 12))
    report = lx.compress_model(model, ratio=0.5, calibration=[ids], progress=False)
    rows = {row.name: row for row in report.layers}
    convs = [n for n, m in original.named_modules() if type(m) is Conv1D]
    assert len(convs) == 8
    for name in convs:
        assert isinstance(model.get_submodule(name), lx.LowRankLinear)
        assert rows[name].rank is not None
    # lm_head shares the token embedding: it stays dense and tied.
    assert "tied to transformer.wte.weight" in rows["lm_head"].note
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        logits = model(ids).logits
        reference = original(ids).logits
    assert torch.isfinite(logits).all()
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.5  # a real, if lossy, approximation of the same function

    path = tmp_path / "gpt2.safetensors"
    lx.save_compressed(model, path)
    fresh = transformers.GPT2LMHeadModel(config).eval()
    lx.load_compressed(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, logits, rtol=0, atol=0)


def _gpt2_pair(rank=4, alpha=8):
    """(tiny GPT-2 with peft adapters on its Conv1D layers, a copy with ours, the
    plain copy), the adapters' weights equal."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=60,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ours, plain = copy.deepcopy(model), copy.deepcopy(model)
    targets = ["c_attn", "c_fc"]
    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=True,
        init_lora_weights=False)).eval()
    names = lx.add_lora(ours, rank, alpha, include=targets)
    assert len(names) == 4 and all(type(plain.get_submodule(n)) is Conv1D for n in names)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name in names:
            ours.get_submodule(name).A.copy_(inner.get_submodule(name).lora_A["default"].weight)
            ours.get_submodule(name).B.copy_(inner.get_submodule(name).lora_B["default"].weight)
    return peft_model, ours.eval(), plain, names


def test_lora_on_conv1d_equals_peft_fan_in_fan_out():
    peft_model, ours, plain, names = _gpt2_pair()
    ids = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        expected = peft_model(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected)
        layer = ours.get_submodule(names[0])
        assert (layer.in_features, layer.out_features) == (32, 96)
        assert layer.weight is layer.base.weight and layer.weight.shape == (32, 96)
        # Merged: the same weights as peft's merge, in Conv1D's layout.
        peft_model.merge_adapter()
        for name in names:
            ours.get_submodule(name).merge()
            torch.testing.assert_close(ours.get_submodule(name).base.weight,
                                       peft_model.base_model.model.get_submodule(name).weight)
        torch.testing.assert_close(ours(ids).logits, expected)
        for name in names:
            ours.get_submodule(name).unmerge()
        torch.testing.assert_close(ours(ids).logits, expected)
        with lx.disable_lora(ours):
            torch.testing.assert_close(ours(ids).logits, plain(ids).logits)
    # Training reaches A and B of every adapter.
    ours.train()
    ours(ids).logits.square().mean().backward()
    assert all(ours.get_submodule(n).A.grad is not None for n in names)


def test_lora_on_conv1d_pissa_keeps_outputs_and_merge_lora_unwraps():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=60,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        lx.add_lora(model, 4, include="c_proj", init="pissa")
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-5)
        lx.merge_lora(model)
    assert type(model.transformer.h[0].attn.c_proj) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-5)


def test_from_peft_and_save_peft_adapter_with_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_model, ours, plain, names = _gpt2_pair()
    ids = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        expected = peft_model(ids).logits
    converted = lx.from_peft(peft_model)
    assert all(isinstance(converted.get_submodule(n), lx.LoRALinear) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, expected)
    lx.save_peft_adapter(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    # Linear and Conv1D layers in one adapter: peft sets fan_in_fan_out per
    # layer kind as it loads, so one config serves both.
    mixed = copy.deepcopy(plain)
    lx.add_lora(mixed, 2, include=["c_attn", "lm_head"])
    with torch.no_grad():
        for name in ("transformer.h.0.attn.c_attn", "lm_head"):
            mixed.get_submodule(name).B.normal_()
        expected = mixed(ids).logits
    lx.save_peft_adapter(mixed, tmp_path / "mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's fan_in_fan_out notice
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "mixed").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
