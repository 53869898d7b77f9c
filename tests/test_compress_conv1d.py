"""compress_model and load_compressed on transformers' Conv1D layers (GPT-2's linear layers)."""

import copy

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


def test_add_lora_targets_nn_linear_only():
    with pytest.raises(ValueError,
                       match="include pattern 'proj' matches no nn.Linear layer \\(candidates: out"):
        lx.add_lora(ConvNet(), 2, include="proj")
