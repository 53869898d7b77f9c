"""Which mask leaves a tensor's padding out: the calibration, the sensitivity probes, distill.

A batch's ``attention_mask`` describes one input's tokens. Matched to tensors
by shape alone it was applied wherever the lengths happened to agree: to a T5
decoder as long as its encoder (real decoder tokens dropped, the batch's
``decoder_attention_mask`` ignored), to CLIP's vision tower when the padded
text is as long as the image's tokens. The references here take each
tensor's rows by hand, from inputs and outputs caught with hooks on plain
forward passes of tiny random models (nothing downloaded).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx
from lowrank_ext.calibration import collect_input_grams
from lowrank_ext.sensitivity import OutputRecorder

T = pytest.importorskip("transformers")

ENC, DEC = "attention_mask", "decoder_attention_mask"  # the mask a reference keeps rows by


def _quiet(build, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build(*args, **kwargs).double().eval()


def _t5():
    config = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                        decoder_start_token_id=0, dropout_rate=0.0, tie_word_embeddings=False,
                        use_cache=False)
    return _quiet(T.T5ForConditionalGeneration, config)


def _t5_batch(decoder_length=8, decoder_mask=False, seed=1):
    """Encoder inputs of 8 tokens, right-padded; decoder inputs all real unless ``decoder_mask``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask,
             "decoder_input_ids": torch.randint(1, 64, (3, decoder_length), generator=g)}
    if decoder_mask:
        # Padding elsewhere than the encoder's.
        dmask = torch.ones_like(batch["decoder_input_ids"])
        dmask[1, 4:] = 0
        dmask[2, 2:] = 0
        batch[DEC] = dmask
    return batch


def _grams_by_hand(model, layers, batch):
    """{name: XᵀX in float64} over the rows of each layer's inputs that ``layers[name]``
    (a key of ``batch``, or None for every row) keeps, from one plain forward pass."""
    seen = {name: [] for name in layers}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0].detach().clone()))
        for name in layers]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    grams = {}
    for name, key in layers.items():
        rows = torch.cat([x.reshape(-1, x.shape[-1]) if key is None else x[batch[key] != 0]
                          for x in seen[name]]).double()
        grams[name] = rows.T @ rows
    return grams


def _check_grams(model, layers, batch, prefix=""):
    got = collect_input_grams(model, {n: model.get_submodule(n) for n in layers}, [batch])
    expected = _grams_by_hand(model, layers, batch)
    for name in layers:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10,
                                   msg=lambda m, name=name: f"{prefix}{name}: {m}")


_T5_LAYERS = {
    "encoder.block.0.layer.0.SelfAttention.q": ENC,
    "encoder.block.0.layer.1.DenseReluDense.wi": ENC,
    "decoder.block.0.layer.0.SelfAttention.q": DEC,
    "decoder.block.0.layer.1.EncDecAttention.q": DEC,
    "decoder.block.0.layer.1.EncDecAttention.k": ENC,  # reads the encoder's outputs
    "decoder.block.0.layer.2.DenseReluDense.wi": DEC,
    "lm_head": DEC,
}


def test_t5_layers_take_the_mask_of_the_tokens_they_see():
    # Decoder as long as the encoder: its layers were given the encoder's mask.
    # Without a decoder_attention_mask every decoder token counts.
    layers = {n: (None if key == DEC else key) for n, key in _T5_LAYERS.items()}
    _check_grams(_t5(), layers, _t5_batch(decoder_length=8))


@pytest.mark.parametrize("decoder_length", [8, 5])
def test_t5_decoder_layers_take_the_decoder_attention_mask(decoder_length):
    _check_grams(_t5(), _T5_LAYERS, _t5_batch(decoder_length, decoder_mask=True))


def test_t5_decoder_factors_equal_those_of_a_callable_running_the_same_passes():
    # A callable leaves no padding out: on decoder layers, fed only real
    # tokens, the two calibrations must agree.
    batches = [_t5_batch(seed=seed) for seed in (1, 2)]
    include = ["decoder.block.0.layer.0.SelfAttention.*",
               "decoder.block.0.layer.1.EncDecAttention.q",
               "decoder.block.0.layer.2.DenseReluDense.wi", "lm_head"]
    factors = []
    for calibration in (batches, lambda model: [model(**b) for b in batches]):
        model = _t5()
        lx.compress_model(model, rank=4, calibration=calibration, include=include, progress=False)
        factors.append({k: v for k, v in model.state_dict().items() if k.endswith((".A", ".B"))})
    assert len(factors[0]) == 2 * 6
    for key, value in factors[0].items():
        torch.testing.assert_close(value, factors[1][key], rtol=1e-9, atol=1e-9, msg=key)


def test_a_wrapped_t5_is_recognised_too():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.t5 = _t5()

        def forward(self, **batch):
            return self.t5(**batch)

    layers = {"t5.encoder.block.0.layer.0.SelfAttention.q": ENC,
              "t5.decoder.block.0.layer.0.SelfAttention.q": None,
              "t5.decoder.block.0.layer.1.EncDecAttention.k": ENC}
    _check_grams(Wrapper(), layers, _t5_batch(decoder_length=8))


@pytest.mark.parametrize("decoder_mask", [False, True])
def test_an_encoder_output_projected_for_the_decoder_keeps_the_encoder_mask(decoder_mask):
    # EncoderDecoderModel with a decoder wider than its encoder projects the
    # encoder's output (enc_to_dec_proj) before the cross-attention reads it.
    encoder = T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32)
    decoder = T.BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, is_decoder=True,
                           add_cross_attention=True)
    config = T.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model = _quiet(T.EncoderDecoderModel, config=config)
    assert model.enc_to_dec_proj is not None
    key = next(n for n, _ in model.named_modules()
               if "crossattention" in n and n.endswith(".key"))
    query = key[:-len("key")] + "query"
    batch = _t5_batch(decoder_length=8, decoder_mask=decoder_mask)
    _check_grams(model, {key: ENC, query: DEC if decoder_mask else None}, batch)


@pytest.mark.parametrize("decoder_length", [17, 4])  # the image's tokens, the queries
def test_parts_beside_an_inner_encoder_decoder_keep_every_token(decoder_length):
    # Blip2 over T5: the vision model, the Q-Former and the projection feed
    # the T5 model; the decoder's mask is T5's decoder's alone.
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    qformer = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, encoder_hidden_size=16, max_position_embeddings=32)
    text = dict(model_type="t5", vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                num_heads=2, decoder_start_token_id=0, dropout_rate=0.0,
                tie_word_embeddings=False)
    config = T.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                           num_query_tokens=4, image_token_index=63)
    model = _quiet(T.Blip2ForConditionalGeneration, config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # activations far from zero: rows left out show in the grams
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    ids = torch.randint(3, 60, (2, 9), generator=g)
    ids[:, :4] = 63  # where the queries go
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    dmask = torch.ones(2, decoder_length, dtype=torch.long)
    dmask[1, 2:] = 0
    batch = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
             "input_ids": ids, "attention_mask": mask,
             "decoder_input_ids": torch.randint(3, 60, (2, decoder_length), generator=g),
             DEC: dmask}
    _check_grams(model, {"vision_model.encoder.layers.0.self_attn.qkv": None,
                         "qformer.encoder.layer.0.attention.attention.query": None,
                         "language_projection": None,
                         "language_model.encoder.block.0.layer.0.SelfAttention.q": ENC,
                         "language_model.decoder.block.0.layer.0.SelfAttention.q": DEC},
                 batch)


def _clip():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=100, max_position_embeddings=32)
    # 32×32 images in 8×8 patches: 16 patches and a class token, 17 tokens.
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=32, patch_size=8)
    config = T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return _quiet(T.CLIPModel, config)


def _clip_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (2, 17), generator=g)  # as long as the image's tokens
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)}


def test_clip_vision_layers_keep_every_token_when_the_text_is_as_long():
    layers = {"vision_model.encoder.layers.0.self_attn.q_proj": None,
              "vision_model.encoder.layers.0.mlp.fc1": None,
              "text_model.encoder.layers.0.self_attn.q_proj": ENC,
              "text_model.encoder.layers.0.mlp.fc1": ENC}
    _check_grams(_clip(), layers, _clip_batch())


class _TokensAndSignal(nn.Module):
    """Tokens embedded and projected; beside them a signal cut by ``other``'s
    convolution into as many steps as there are tokens, then projected."""

    def __init__(self, stride):
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.text = nn.Linear(8, 8)
        self.other = nn.ModuleDict({"conv": nn.Conv1d(8, 8, kernel_size=4, stride=stride),
                                    "proj": nn.Linear(8, 8)})

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask, signal):
        steps = self.other.conv(signal).transpose(1, 2)
        return self.text(self.embed(input_ids)), self.other.proj(steps)


@pytest.mark.parametrize("stride, mask", [(4, None), (1, ENC)])
def test_only_a_part_embedding_an_input_of_its_own_is_another_tower(stride, mask):
    # A patch convolution (stride = kernel) embeds another input: its tokens
    # are not the text's. Any other convolution (Mamba's, say) works on the
    # text's tokens, which keep their mask.
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 5), generator=g)
    attention_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    length = 4 * 5 if stride == 4 else 5 + 3
    signal = torch.randn(2, 8, length, generator=g, dtype=torch.float64)
    model = _TokensAndSignal(stride).double()
    _check_grams(model, {"text": ENC, "other.proj": mask},
                 {"input_ids": ids, "attention_mask": attention_mask, "signal": signal})


@pytest.mark.parametrize("name, build, layers", [
    ("llama", lambda: _quiet(T.LlamaForCausalLM, T.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)),
     ["model.layers.0.self_attn.q_proj", "lm_head"]),  # lm_head lies outside .model
    # Embeddings inside the encoder (relative positions) make no other tower.
    ("mpnet", lambda: _quiet(T.MPNetModel, T.MPNetConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=32)),
     ["encoder.layer.0.attention.attn.q", "encoder.layer.0.intermediate.dense"]),
    # The encoder embeds with a module of its own tied to the model's embedding.
    ("t5-encoder", lambda: _quiet(T.T5EncoderModel, T.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        dropout_rate=0.0)), ["encoder.block.0.layer.0.SelfAttention.q"]),
])
def test_single_stack_models_still_leave_padding_out_everywhere(name, build, layers):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[mask == 0] = 1
    _check_grams(build(), dict.fromkeys(layers, ENC), {"input_ids": ids, "attention_mask": mask},
                 prefix=f"{name}: ")


def test_sensitivity_compares_each_output_at_its_own_real_tokens():
    # T5 (logits from the decoder, every token real; the encoder's last hidden
    # state at its real tokens) and CLIP (the vision tower's hidden states
    # whole, the text's at real tokens). All are at most 64 wide: the
    # recorder keeps their rows unprojected.
    for model, batch, expected in (
            (_t5(), _t5_batch(decoder_length=8),
             lambda out, b: {"logits": out.logits.reshape(-1, 64),
                             "encoder": out.encoder_last_hidden_state[b[ENC] != 0]}),
            (_clip(), _clip_batch(),
             lambda out, b: {"vision": out.vision_model_output.last_hidden_state.reshape(-1, 32),
                             "text": out.text_model_output.last_hidden_state[b[ENC] != 0]})):
        (recorded,) = OutputRecorder(model).record([batch])
        with torch.no_grad():
            wanted = expected(model(**batch), batch)
        for label, rows in wanted.items():
            assert any(r.shape == rows.shape and torch.equal(r, rows) for r in recorded), (
                label, [tuple(r.shape) for r in recorded])


def _relative(s, t, keep):
    if keep is not None:
        s, t = s[keep != 0], t[keep != 0]
    return float((s - t).pow(2).sum() / t.pow(2).sum())


@pytest.mark.parametrize("decoder_mask", [False, True])
def test_distill_loss_leaves_out_the_padding_of_each_tensor_s_own_tokens(decoder_mask):
    teacher = _t5()
    student = copy.deepcopy(teacher)
    lx.compress_model(student, rank=4, progress=False)
    batch = _t5_batch(decoder_length=8, decoder_mask=decoder_mask)
    ffs = ["encoder.block.0.layer.1", "decoder.block.0.layer.2"]  # T5LayerFF: a tensor each
    outputs = []
    for model in (student, teacher):
        caught = {}
        handles = [model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: caught.__setitem__(n, out)) for n in ffs]
        with torch.no_grad():
            outputs.append((model(**batch), caught))
        for handle in handles:
            handle.remove()
    (s, s_ffs), (t, t_ffs) = outputs
    enc, dec = batch[ENC], batch.get(DEC)
    expected = (_relative(s.logits, t.logits, dec)
                + _relative(s.encoder_last_hidden_state, t.encoder_last_hidden_state, enc)
                + _relative(s_ffs[ffs[0]], t_ffs[ffs[0]], enc)
                + _relative(s_ffs[ffs[1]], t_ffs[ffs[1]], dec))
    result = lx.distill(student, teacher, [batch], steps=1, lr=1e-12, match=ffs, progress=False)
    assert result.first_loss == pytest.approx(expected, rel=1e-9)


def test_distill_loss_sees_decoder_tokens_where_the_encoder_is_padded():
    teacher = _t5()
    student = copy.deepcopy(teacher)
    lx.compress_model(student, rank=4, progress=False)
    batch = _t5_batch(decoder_length=8)
    changed = dict(batch, decoder_input_ids=batch["decoder_input_ids"].clone())
    changed["decoder_input_ids"][0, 3:] = 1 + changed["decoder_input_ids"][0, 3:] % 63
    assert (batch[ENC][0, 3:] == 0).all()  # the encoder is padded there
    losses = [lx.distill(copy.deepcopy(student), teacher, [b], steps=1, lr=1e-12,
                         progress=False).first_loss for b in (batch, changed)]
    assert losses[0] != losses[1]
