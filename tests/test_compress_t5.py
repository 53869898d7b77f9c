"""compress_model, add_lora and load_compressed on a tiny T5 from transformers.

T5's feed-forward blocks read ``wo.weight.dtype`` in their forward (to cast
their activations), so a compressed ``wo`` must answer it: LowRankLinear's
``weight`` is a metadata-only stand-in. Outputs are checked against the same
model with every factorized layer replaced by its dense float64 product.
"""

import warnings

import pytest
import torch

import lowrank_ext as lx
from reference import dense_float64_copy

transformers = pytest.importorskip("transformers")


def _t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, dropout_rate=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.T5ForConditionalGeneration(config).eval()


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :5].clone()}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_compressed_t5_matches_its_dense_float64_product_and_generates(tmp_path):
    model = _t5()
    batch = _batch()
    original = _logits(model, batch)
    report = lx.compress_model(model, ratio=0.6, calibration=[batch], progress=False)
    compressed = [n for n, r in report.ranks.items() if r is not None]
    assert any(n.endswith("DenseReluDense.wo") for n in compressed)
    got = _logits(model, batch)
    torch.testing.assert_close(got.double(), _logits(dense_float64_copy(model), batch),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, original)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    path = tmp_path / "t5.safetensors"
    lx.save_compressed(model, path)
    fresh = _t5()
    lx.load_compressed(fresh, path)
    torch.testing.assert_close(_logits(fresh, batch), got)


def test_lora_t5_trains_the_adapters_only():
    model = _t5().train()
    names = lx.add_lora(model, 2, include=["q", "v", "wo"])
    assert names
    batch = _batch()
    loss = model(**batch, labels=batch["decoder_input_ids"]).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith((".A", ".B")), name
