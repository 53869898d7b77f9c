"""This session's module paths on every device: DoRA, LoRA over a LowRankLinear,
SplitMultiheadAttention and compress_model(rank_multiple=...). The CPU runs
check the tests themselves here; the CUDA runs skip without a GPU."""

import copy

import pytest
import torch
from torch import nn

import lowrank_ext as lx
from lowrank_ext.attention import SplitMultiheadAttention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 4e-2}


def _close(out, ref, dtype):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    scale = max(1.0, float(ref.abs().max()))
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL))
def test_dora_forward_backward_and_merge(device, dtype):
    torch.manual_seed(0)
    lora = lx.LoRALinear(nn.Linear(64, 48, dtype=dtype), 8, use_dora=True).to(device)
    with torch.no_grad():
        lora.B.normal_()
        lora.magnitude.mul_(1.5)
    x = torch.randn(5, 64, dtype=dtype, device=device, requires_grad=True)
    # float64 CPU reference of the same function, differentiated by autograd
    W, b = (t.detach().double().cpu() for t in (lora.base.weight, lora.base.bias))
    A, B, m = (t.detach().double().cpu().requires_grad_() for t in (lora.A, lora.B,
                                                                    lora.magnitude))
    x_ref = x.detach().double().cpu().requires_grad_()
    merged = W + lora.scale * (B @ A)
    ref = (x_ref @ merged.T) * (m / torch.linalg.vector_norm(merged, dim=1).detach()) + b
    out = lora(x)
    _close(out, ref, dtype)
    grad = torch.randn_like(ref)
    out.backward(grad.to(device, dtype))
    ref.backward(grad)
    for got, expected in ((x.grad, x_ref.grad), (lora.A.grad, A.grad), (lora.B.grad, B.grad),
                          (lora.magnitude.grad, m.grad)):
        _close(got, expected, dtype)
    with torch.no_grad():
        before = lora(x)
        lora.merge()
        _close(lora(x), before, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_over_a_lowrank_layer_and_its_exact_merge(device, dtype):
    torch.manual_seed(0)
    base = lx.LowRankLinear(64, 48, 12, dtype=dtype, device=device)
    lora = lx.LoRALinear(base, 4, 8.0)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(7, 64, dtype=dtype, device=device)
    weight = (base.B.double() @ base.A.double()
              + lora.scale * (lora.B.double() @ lora.A.double())).detach()
    ref = x.double() @ weight.T + base.bias.detach().double()
    _close(lora(x), ref, dtype)
    own = base.A.detach().clone()
    lora.merge()
    assert base.rank == 16 and base.A.device.type == device
    _close(lora(x), ref, dtype)
    lora.unmerge()
    assert torch.equal(base.A, own)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_weights", [False, True])
def test_split_attention_equals_multihead_attention(device, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True, device=device).eval()
    split = SplitMultiheadAttention.from_multihead_attention(mha)
    q = torch.randn(3, 5, 32, device=device)
    kv = torch.randn(3, 7, 32, device=device)
    padding = torch.zeros(3, 7, dtype=torch.bool, device=device)
    padding[1, -3:] = True
    mask = torch.rand(5, 7, device=device) > 0.8  # boolean, as the padding mask
    mask[:, 0] = False  # every query keeps a key
    expected, expected_weights = mha(q, kv, kv, key_padding_mask=padding, attn_mask=mask,
                                     need_weights=need_weights)
    out, weights = split(q, kv, kv, key_padding_mask=padding, attn_mask=mask,
                         need_weights=need_weights)
    _close(out, expected, torch.float32)
    if need_weights:
        _close(weights, expected_weights, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_compress_with_split_attention_and_rank_blocks(device):
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0,
                                                             batch_first=True),
                                  2, enable_nested_tensor=False).to(device).eval()
    x = torch.randn(4, 9, 64, device=device)
    original = copy.deepcopy(model)
    lx.split_attention(model)
    report = lx.compress_model(model, ratio=0.6, rank_multiple=8, calibration=[x])
    assert report.ranks and all(r % 8 == 0 for r in report.ranks.values())
    assert report.params_after <= 0.6 * report.params_before
    assert all(p.device.type == device for p in model.parameters())
    cosine = nn.functional.cosine_similarity(model(x).flatten(), original(x).flatten(), dim=0)
    assert cosine > 0.5  # a working model, not a check of quality
