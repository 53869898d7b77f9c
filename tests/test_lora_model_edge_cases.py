"""add_lora, merge_lora and load_lora_state_dict at the edges: several calls,
refusals before anything changes, the output layer of "all-linear", compiled
and meta-device layers."""

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lowrank_ext as lx


def _two_layers(device="cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(OrderedDict(a=nn.Linear(8, 8), b=nn.Linear(8, 4)))


def test_a_second_add_lora_keeps_the_first_adapters_trainable():
    """Several calls are how layers get different ranks; freeze=True froze the
    first call's adapters, and an optimizer built after skipped them."""
    model = _two_layers()
    lx.add_lora(model, 2, include="a")
    lx.add_lora(model, 4, include="b")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a.A", "a.B", "b.A", "b.B"}


def test_a_second_add_lora_leaves_a_frozen_adapter_frozen():
    model = _two_layers()
    lx.add_lora(model, 2, include="a")
    model.a.A.requires_grad_(False)
    model.a.B.requires_grad_(False)
    lx.add_lora(model, 4, include="b")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"b.A", "b.B"}


class _Identity(nn.Module):
    def forward(self, t):
        return t


def test_merge_lora_refuses_before_merging_any_layer():
    """The second layer cannot take its adapter: the first stays bit for bit
    as it was (undoing a merge restores it only up to rounding)."""
    model = _two_layers()
    lx.add_lora(model, 2)
    with torch.no_grad():
        model.a.B.normal_()
        model.b.B.normal_()
    parametrize.register_parametrization(model.b.base, "weight", _Identity())
    weight = model.a.base.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge_lora: the base layer of b cannot take the "
                                         r"adapter: its weight is parametrized \(_Identity\)"):
        lx.merge_lora(model)
    assert isinstance(model.a, lx.LoRALinear) and not model.a.merged
    assert torch.equal(model.a.base.weight, weight)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1,
                                     n_head=4, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_all_linear_takes_an_exclude_naming_the_output_layer():
    """peft accepts exclude_modules=["lm_head"] with "all-linear"; the pattern
    was refused as matching no layer, the output layer being dropped before."""
    model = _gpt2()
    names = lx.add_lora(model, 2, include="all-linear", exclude="lm_head")
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert type(model.lm_head) is nn.Linear


def test_all_linear_still_leaves_the_output_layer_out_and_checks_exclude():
    model = _gpt2()
    assert "lm_head" not in lx.add_lora(model, 2, include="all-linear")
    with pytest.raises(ValueError, match="exclude pattern 'nothing_here' matches no"):
        lx.add_lora(_gpt2(), 2, include="all-linear", exclude="nothing_here")


def test_all_linear_with_only_the_output_layer_is_refused():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ValueError, match="include='all-linear' leaves out the model's output "
                                         "layer, and no other layer is left"):
        lx.add_lora(Head(), 2, include="all-linear")


def test_a_lowrank_layer_compiled_on_its_own_is_left_alone():
    model = nn.Sequential(OrderedDict(a=lx.LowRankLinear(8, 8, 2), b=lx.LowRankLinear(8, 8, 2)))
    model.b = torch.compile(model.b, backend="eager")
    assert lx.add_lora(model, 2) == ["a"]
    assert isinstance(model.a, lx.LoRALinear)
    assert isinstance(model.b._orig_mod, lx.LowRankLinear)


def test_a_bare_conv1d_is_named():
    transformers_pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = transformers_pytorch_utils.Conv1D(8, 4)
    with pytest.raises(TypeError, match="add_lora: the model is itself a Conv1D; wrap it with "
                                        r"LoRALinear\(model, rank\)"):
        lx.add_lora(layer, 2)
    assert all(p.requires_grad for p in layer.parameters())


def test_pissa_on_a_meta_model():
    model = _two_layers("meta")
    assert lx.add_lora(model, 2, init="pissa") == ["a", "b"]
    assert model.a.A.is_meta and model.a.base.weight.is_meta


def test_loading_values_into_a_meta_model_is_refused():
    """copy_ into a meta parameter keeps nothing: the values vanished silently."""
    source = _two_layers()
    lx.add_lora(source, 2)
    state = {key: torch.randn_like(value) for key, value in lx.lora_state_dict(source).items()}
    model = _two_layers("meta")
    lx.add_lora(model, 2)
    with pytest.raises(ValueError, match=r"the model's a.A is on the meta device, where the "
                                         r"values would be dropped; materialize the model first"):
        lx.load_lora_state_dict(model, state)
    model.to_empty(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.load_lora_state_dict(model, state)
    assert torch.equal(model.a.A, state["a.A"])


def test_saving_a_meta_model_as_a_peft_adapter_is_refused_in_its_own_words(tmp_path):
    pytest.importorskip("peft")
    model = _two_layers("meta")
    lx.add_lora(model, 2)
    with pytest.raises(ValueError, match=r"save_peft_adapter: base_model.model.a.lora_A.weight "
                                         r"is on the meta device and holds no values"):
        lx.save_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_loading_the_model_s_own_adapters_under_swapped_keys():
    # lora_state_dict shares memory with the parameters: copied key by key, a
    # later key read values an earlier copy had overwritten.
    model = _two_layers()
    lx.add_lora(model, 2, include="a")
    lx.add_lora(model, 2, include="b")
    with torch.no_grad():
        for p in lx.lora_state_dict(model).values():
            p.normal_()
    own = lx.lora_state_dict(model)
    expected = {"a.A": own["b.A"].clone(), "b.A": own["a.A"].clone(),
                "a.B": own["a.B"].clone(), "b.B": own["b.B"].clone()}
    lx.load_lora_state_dict(model, {"a.A": own["b.A"], "b.A": own["a.A"],
                                    "a.B": own["a.B"], "b.B": own["b.B"]})
    for key, value in lx.lora_state_dict(model).items():
        assert torch.equal(value, expected[key]), key


def test_loading_sources_that_alias_other_keys_through_another_storage():
    # Views of one flat buffer, and numpy arrays over the same memory (another
    # storage object at an offset), read values already overwritten.
    model = _two_layers()
    lx.add_lora(model, 2, include="a")
    lx.add_lora(model, 2, include="b")
    flat = torch.randn(1 + sum(p.numel() for p in lx.lora_state_dict(model).values()))
    offset = 1  # every view at an offset into the buffer
    for key, param in lx.lora_state_dict(model).items():
        owner = model.get_submodule(key.rpartition(".")[0])
        getattr(owner, key.rpartition(".")[2]).data = flat[offset:offset + param.numel()].view(
            param.shape)
        offset += param.numel()
    own = lx.lora_state_dict(model)
    expected = {"a.A": own["b.A"].clone(), "b.A": own["a.A"].clone()}
    lx.load_lora_state_dict(model, {"a.A": torch.from_numpy(own["b.A"].numpy()),
                                    "b.A": torch.from_numpy(own["a.A"].numpy()),
                                    "a.B": own["a.B"], "b.B": own["b.B"]})
    for key, value in expected.items():
        assert torch.equal(lx.lora_state_dict(model)[key], value), key


_DTENSOR_ADAPTERS = """
import os, socket, torch, torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
import lowrank_ext as lx
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)
try:
    mesh = DeviceMesh("cpu", [0])
    model = nn.Sequential(nn.Linear(8, 8))
    lx.add_lora(model, 2)
    for name in ("A", "B"):
        value = getattr(model[0], name).detach()
        setattr(model[0], name, nn.Parameter(distribute_tensor(value, mesh, [Shard(0)])))
    state = {k: v.detach().clone() + 1 for k, v in lx.lora_state_dict(model).items()}
    lx.load_lora_state_dict(model, state)
    assert all(torch.equal(p.full_tensor(), state[k].full_tensor())
               for k, p in lx.lora_state_dict(model).items())
    print("loaded")
finally:
    dist.destroy_process_group()
"""


def test_adapters_sharded_as_dtensors_load():
    # FSDP2's fully_shard makes every parameter a DTensor, which has no
    # storage: an aliasing check by storage address failed on them.
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _DTENSOR_ADAPTERS], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr[-2000:]
