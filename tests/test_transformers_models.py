"""compress_model and add_lora across tiny transformers models of many families.

Each model is built from a small random config (nothing downloaded), compressed
with calibration on one batch and checked on another against the same model
with every factorized layer replaced by its dense float64 product; then, fresh,
given LoRA adapters with non-zero B, checked the same way and trained one step
(gradients on the adapters only). Model code that reads a layer's ``weight``
in its forward (T5's ``wo.weight.dtype``, also in mT5) or calls the layers in
unusual ways is what this catches.
"""

import warnings

import pytest
import torch

import lowrank_ext as lx
from reference import dense_float64_copy

T = pytest.importorskip("transformers")

_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64)


def _configs():
    return {
        "bert": (T.BertConfig, dict(_COMMON), "BertModel"),
        "distilbert": (T.DistilBertConfig, dict(vocab_size=96, dim=32, n_layers=2, n_heads=4,
                                                hidden_dim=64, max_position_embeddings=64),
                       "DistilBertModel"),
        "gpt2": (T.GPT2Config, dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                    n_positions=64), "GPT2LMHeadModel"),
        "llama": (T.LlamaConfig, dict(_COMMON, num_key_value_heads=2), "LlamaForCausalLM"),
        "qwen2": (T.Qwen2Config, dict(_COMMON, num_key_value_heads=2), "Qwen2ForCausalLM"),
        "phi": (T.PhiConfig, dict(_COMMON), "PhiForCausalLM"),
        "gpt_neox": (T.GPTNeoXConfig, dict(_COMMON), "GPTNeoXForCausalLM"),
        "opt": (T.OPTConfig, dict(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                  ffn_dim=64, num_attention_heads=4, max_position_embeddings=64,
                                  word_embed_proj_dim=32), "OPTForCausalLM"),
        "bart": (T.BartConfig, dict(vocab_size=96, d_model=32, encoder_layers=2,
                                    decoder_layers=2, encoder_attention_heads=4,
                                    decoder_attention_heads=4, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_position_embeddings=64),
                 "BartForConditionalGeneration"),
        "mt5": (T.MT5Config, dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                  num_heads=4, decoder_start_token_id=0),
                "MT5ForConditionalGeneration"),
        "vit": (T.ViTConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, image_size=32, patch_size=8),
                "ViTModel"),
        "whisper": (T.WhisperConfig, dict(vocab_size=96, d_model=32, encoder_layers=1,
                                          decoder_layers=1, encoder_attention_heads=4,
                                          decoder_attention_heads=4, encoder_ffn_dim=64,
                                          decoder_ffn_dim=64, num_mel_bins=16,
                                          max_source_positions=32, max_target_positions=32,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                          decoder_start_token_id=1, suppress_tokens=[],
                                          begin_suppress_tokens=[]),
                    "WhisperForConditionalGeneration"),
    }


FAMILIES = sorted(_configs())


def _model(family):
    config_cls, kwargs, model_name = _configs()[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_cls(**kwargs)
        config.attn_implementation = "eager"  # the same attention code in float32 and float64
        model = getattr(T, model_name)(config)
    return model.eval()


def _batch(family, seed):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if family == "whisper":
        return {"input_features": torch.randn(2, 16, 64, generator=g),
                "decoder_input_ids": torch.randint(3, 96, (2, 5), generator=g)}
    ids = torch.randint(3, 96, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if family in ("bart", "mt5"):
        batch["decoder_input_ids"] = ids[:, :5].clone()
    return batch


def _output(model, batch):
    dtype = next(model.parameters()).dtype
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    out = model(**batch)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _check_against_dense(model, batch):
    with torch.no_grad():
        got = _output(model, batch)
        want = _output(dense_float64_copy(model), batch)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrated_compression(family):
    model = _model(family)
    with torch.no_grad():
        original = _output(model, _batch(family, 2))
    report = lx.compress_model(model, ratio=0.6, calibration=[_batch(family, 1)], progress=False)
    assert sum(isinstance(m, lx.LowRankLinear) for m in model.modules()) >= 4, report
    got = _check_against_dense(model, _batch(family, 2))
    assert not torch.allclose(got, original)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_forward_and_training_step(family):
    model = _model(family)
    names = lx.add_lora(model, 2)
    assert len(names) >= 4
    for module in model.modules():
        if isinstance(module, lx.LoRALinear):
            with torch.no_grad():
                module.B.normal_()
    _check_against_dense(model, _batch(family, 2))
    model.train()
    _output(model, _batch(family, 3)).float().square().mean().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained and all(name.endswith((".A", ".B")) for name in trained), trained
    # Every adapter the output depends on trains (a pooler the output skips does not).
    assert len(trained) >= 2 * (len(names) - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_compressed_into_a_model_with_empty_weights(family, tmp_path):
    """The big-model pattern: build with parameters on meta, then load the file."""
    accelerate = pytest.importorskip("accelerate")
    model = _model(family)
    lx.compress_model(model, ratio=0.6, calibration=[_batch(family, 1)], progress=False)
    path = tmp_path / "model.safetensors"
    lx.save_compressed(model, path)
    config_cls, kwargs, model_name = _configs()[family]
    with accelerate.init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = getattr(T, model_name)(model.config).eval()
    assert any(p.is_meta for p in fresh.parameters())
    lx.load_compressed(fresh, path)
    assert not any(t.is_meta for t in list(fresh.parameters()) + list(fresh.buffers()))
    # Weights stored once (tied in the saved model) are one parameter again,
    # though transformers does not tie them on meta.
    assert len(list(fresh.parameters())) == len(list(model.parameters()))
    assert ({n for n, m in fresh.named_modules() if isinstance(m, lx.LowRankLinear)}
            == {n for n, m in model.named_modules() if isinstance(m, lx.LowRankLinear)})
    with torch.no_grad():
        torch.testing.assert_close(_output(fresh, _batch(family, 2)),
                                   _output(model, _batch(family, 2)), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_command_output_loads_into_the_original_model(family, tmp_path, capsys):
    """`python -m lowrank_ext compress` knows no model code: embedding tables, tied
    weights and GPT-2's transposed Conv1D weights must still load, each factorized
    layer holding the truncated SVD of its weight."""
    from safetensors.torch import save_model

    from lowrank_ext._modules import dense_weight
    from lowrank_ext.cli import main

    model = _model(family)
    path, out = tmp_path / "model.safetensors", tmp_path / "out.safetensors"
    save_model(model, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "3"]) == 0
    capsys.readouterr()
    fresh = lx.load_compressed(_model(family), out)
    swapped = {n: m for n, m in fresh.named_modules() if isinstance(m, lx.LowRankLinear)}
    assert len(swapped) >= 4
    for name, layer in swapped.items():
        W = dense_weight(model.get_submodule(name)).detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        torch.testing.assert_close(layer.B.double() @ layer.A.double(),
                                   U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], rtol=1e-4, atol=1e-5)
    _check_against_dense(fresh, _batch(family, 2))


@pytest.mark.parametrize("empty_weights", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_load_compressed_reads_a_sharded_save_pretrained_directory(family, empty_weights,
                                                                   tmp_path):
    """The transformers way to save: ``model.save_pretrained(dir)``, here in several
    shards, with no ranks metadata and tied tensors written under one name."""
    model = _model(family)
    lx.compress_model(model, ratio=0.6, calibration=[_batch(family, 1)], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    if empty_weights:
        accelerate = pytest.importorskip("accelerate")
        with accelerate.init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = getattr(T, _configs()[family][2])(model.config).eval()
    else:
        fresh = _model(family)
    try:
        lx.load_compressed(fresh, tmp_path)
    except ValueError as exc:
        # Some models' keys are renamed on saving (depending on the transformers
        # version); then the error must say so, and the names must indeed differ.
        assert "names its tensors otherwise than the model" in str(exc)
        from safetensors import safe_open
        stored = set()
        for shard in tmp_path.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                stored |= set(f.keys())
        assert not stored <= set(model.state_dict())
        assert not any(isinstance(m, lx.LowRankLinear) for m in fresh.modules())
        return
    assert not any(t.is_meta for t in list(fresh.parameters()) + list(fresh.buffers()))
    assert len(list(fresh.parameters())) == len(list(model.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(_output(fresh, _batch(family, 2)),
                                   _output(model, _batch(family, 2)), rtol=0, atol=0)
