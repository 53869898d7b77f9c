"""add_lora and merge_lora put the model back when they are interrupted midway,
by an exception or a KeyboardInterrupt (which ``except Exception`` misses)."""

import contextlib

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import lowrank_ext as lx


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                         nn.Linear(16, 8))


def _snapshot(model):
    return ([type(m) for m in model],
            {name: (p, p.detach().clone(), p.requires_grad)
             for name, p in model.named_parameters()})


def _assert_unchanged(model, snapshot):
    types, params = snapshot
    assert [type(m) for m in model] == types
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, (p, value, flag) in params.items():
        assert now[name] is p, name
        assert torch.equal(p, value), name
        assert p.requires_grad == flag, name


@contextlib.contextmanager
def _raising_at_registration(error, nth, of_kind):
    """Raise ``error`` when the ``nth`` module of kind ``of_kind`` is set as a submodule."""
    seen = [0]

    def hook(parent, name, submodule):
        if isinstance(submodule, of_kind):
            seen[0] += 1
            if seen[0] == nth:
                raise error("stop")

    handle = torch_module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_add_lora_interrupted_while_building_puts_back_the_pissa_residuals(error):
    model = _model()
    before = _snapshot(model)
    # LoRALinear registers its base as a submodule while it is built.
    with _raising_at_registration(error, 2, nn.Linear), pytest.raises(error):
        lx.add_lora(model, rank=4, include=["0", "2", "4"], init="pissa")
    _assert_unchanged(model, before)


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_add_lora_interrupted_while_swapping_puts_back_every_layer(error):
    model = _model()
    model[2].register_forward_hook(lambda m, args, out: out * 2)
    before = _snapshot(model)
    with _raising_at_registration(error, 2, lx.LoRALinear), pytest.raises(error):
        lx.add_lora(model, rank=4, include=["0", "2", "4"])
    _assert_unchanged(model, before)
    assert len(model[2]._forward_hooks) == 1  # the hook stayed where it was


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_merge_lora_interrupted_leaves_every_adapter_unmerged_in_place(error):
    model = _model()
    lx.add_lora(model, rank=4, include=["0", "2", "4"])
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, lx.LoRALinear):
                layer.B.normal_()
    x = torch.randn(5, 16, dtype=torch.float32)
    with torch.no_grad():
        expected = model(x)
    types = [type(m) for m in model]
    weights = {i: m.base.weight.detach().clone() for i, m in enumerate(model)
               if isinstance(m, lx.LoRALinear)}
    with _raising_at_registration(error, 2, nn.Linear), pytest.raises(error):
        lx.merge_lora(model)
    assert [type(m) for m in model] == types
    for i, weight in weights.items():
        assert not model[i].merged
        # unmerge subtracts what merge added: equal to rounding
        torch.testing.assert_close(model[i].base.weight, weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
