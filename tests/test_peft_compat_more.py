"""from_peft and save_peft_adapter with peft's rarer options: LoRA-GA's
residual, trainable tokens, biases trained with bias="all" then frozen, and a
compiled PeftModel."""

import copy
import json
import os
import warnings

import pytest
import torch

import lowrank_ext as lx
from lowrank_ext import peft_compat

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _bert(cls=None, **options):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=24,
                                     max_position_embeddings=32, **options)
    return (cls or transformers.BertModel)(config).double().eval()


def _ids():
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _hidden(model):
    with torch.no_grad():
        return model(input_ids=_ids()).last_hidden_state


def _perturb_trainable(model, scale=0.3):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.mark.parametrize("init, changes", [("pissa", True), ("pissa_niter_4", True),
                                           ("olora", True), ("corda", True), ("loftq", True),
                                           ("lora_ga", True), ("gaussian", False),
                                           ("orthogonal", False), ("eva", False), (True, False)])
def test_inits_that_leave_a_residual_in_the_base_weight(init, changes):
    """"lora_ga" split at "_" read as "lora", and its residual went unnoticed."""
    assert peft_compat._changes_base(init) is changes


def test_a_lora_ga_adapter_is_not_written_as_one_peft_would_add_to_the_original(tmp_path):
    loraga = pytest.importorskip("peft.tuners.lora.loraga")
    base = _bert().float()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                             init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig())

    def step():
        base(input_ids=_ids()).last_hidden_state.pow(2).sum().mul(1e8).backward()

    loraga.preprocess_loraga(base, config, step)
    base.zero_grad(set_to_none=True)
    converted = lx.from_peft(peft.get_peft_model(base, config))
    assert converted.encoder.layer[0].attention.self.query.init == "lora_ga"
    with pytest.raises(ValueError, match="init='lora_ga', which left a residual in its base "
                                         "weight that peft would not rebuild"):
        lx.save_peft_adapter(converted, tmp_path / "adapter")
    assert not os.path.exists(tmp_path / "adapter")


def test_trainable_tokens_are_refused_before_anything_changes():
    """The wrapper stayed, running the tokens of whichever adapter peft had active."""
    base = _bert()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query"],
                                                      trainable_token_indices=[1, 2]))
    inner = model.base_model.model
    before = {name: type(m) for name, m in inner.named_modules()}
    with pytest.raises(ValueError, match=r"from_peft: embeddings.word_embeddings.* are peft's "
                                         r"trainable-token modules \(trainable_token_indices\)"):
        lx.from_peft(model)
    assert {name: type(m) for name, m in inner.named_modules()} == before


def test_biases_trained_with_bias_all_are_written_after_the_model_is_frozen(tmp_path):
    base = _bert()
    original = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["query", "value"],
                                                      bias="all"))
    _perturb_trainable(model, 0.5)
    model.eval()
    expected = _hidden(model)
    model.requires_grad_(False)  # frozen for inference, as before an export
    converted = lx.from_peft(model)
    lx.save_peft_adapter(converted, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == "all"
    back = peft.PeftModel.from_pretrained(original, tmp_path)
    torch.testing.assert_close(_hidden(back), expected, rtol=1e-10, atol=1e-10)


def test_a_compiled_peft_model_converts_to_its_base_model_and_keeps_peft_s_config(tmp_path):
    base = _bert(transformers.BertForSequenceClassification, num_labels=3)
    fresh = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4,
                                                      target_modules=["query"]))
    model.peft_config["default"].base_model_name_or_path = "my/base"
    _perturb_trainable(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = lx.from_peft(torch.compile(model, backend="eager"))
    assert type(converted) is transformers.BertForSequenceClassification
    lx.save_peft_adapter(converted, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["task_type"], config["base_model_name_or_path"]) == ("SEQ_CLS", "my/base")
    back = peft.PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=_ids()).logits, expected)


def test_a_compiled_model_holding_peft_layers_is_returned_compiled():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"]), model)
    compiled = torch.compile(model, backend="eager")
    assert lx.from_peft(compiled) is compiled
    assert isinstance(compiled._orig_mod[0], lx.LoRALinear)


def test_an_adapter_over_replicated_layers_is_written_with_the_replication(tmp_path):
    # peft's layer_replication builds extra decoder layers from ranges of the
    # original's; the adapter was written without it, and peft then loaded it
    # into the original's two layers, dropping the third's adapter silently.
    def llama():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(config).double().eval()

    def logits(model):
        with torch.no_grad():
            return model(input_ids=_ids()).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on replicated layers
        model = peft.get_peft_model(llama(), peft.LoraConfig(
            r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]))
    _perturb_trainable(model)
    model.eval()
    expected = logits(model)
    converted = lx.from_peft(model)
    assert len(converted.model.layers) == 3
    lx.save_peft_adapter(converted, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layer_replication"] == [[0, 2], [1, 2]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    assert len(back.base_model.model.model.layers) == 3
    torch.testing.assert_close(logits(back), expected, rtol=1e-10, atol=1e-10)


def test_a_base_layer_with_a_forward_set_on_the_instance_is_refused_by_name():
    # A LoRALinear reads its base's weight and would skip that forward
    # (accelerate's hooks set one); the message spoke of a subclass.
    model = peft.get_peft_model(_bert(), peft.LoraConfig(r=4, target_modules=["query"]))
    query = model.base_model.model.encoder.layer[0].attention.self.query
    original = query.base_layer.forward
    query.base_layer.forward = lambda x: original(x) * 10
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(TypeError, match="the base of layer 'encoder.layer.0.attention.self.query' has a forward set on the instance"):
        lx.from_peft(model)
    assert type(query).__module__.startswith("peft")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
