"""compress_model, load_compressed, add_lora and merge_lora stopped halfway, by an error or a
KeyboardInterrupt (Ctrl-C): the model is left as it was, the exception unchanged."""

import contextlib
import itertools

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import lowrank_ext as lx
from lowrank_ext import _modules

# Where nn.Module keeps a module's hooks (read with getattr: a torch release may lack some).
HOOK_ATTRS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_backward_pre_hooks", "_backward_hooks")
ERRORS = [ValueError, KeyboardInterrupt]


class Net(nn.Module):
    """An embedding tied to its output head, a LayerNorm and a BatchNorm (buffers)
    between two Linear layers compression replaces."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(),
                                  nn.Linear(32, 16), nn.BatchNorm1d(16))
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def build(seed):
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():  # values no fresh model has
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.body[4].running_mean.normal_()
        model.body[4].running_var.uniform_(0.5, 2.0)
    return model


def hooked(model):
    """Give the layers hooks of every kind and freeze a parameter; return the handles."""
    def note(*args, **kwargs):
        return None
    model.body[1].weight.requires_grad_(False)
    return [model.body[0].register_forward_pre_hook(note),
            model.body[0].register_forward_hook(note, with_kwargs=True),
            model.body[3].register_full_backward_hook(note),
            model.body[3].register_forward_hook(note, always_call=True),
            model.body[1].register_forward_hook(note)]


def snapshot(model):
    """Everything a failed call must leave as it was, by name."""
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False),
                              model.named_buffers(remove_duplicate=False))
    return {
        "modules": modules,
        "tensors": {name: (t, t.detach().clone(), t.requires_grad, t.device)
                    for name, t in tensors},
        "hooks": {name: (m._is_full_backward_hook,
                         [(attr, getattr(m, attr), list(getattr(m, attr).items()))
                          for attr in HOOK_ATTRS if hasattr(m, attr)])
                  for name, m in modules.items()},
    }


def assert_as_before(model, before):
    after = snapshot(model)
    assert after["modules"].keys() == before["modules"].keys()
    for name, module in before["modules"].items():
        assert after["modules"][name] is module, name
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, value, requires_grad, device) in before["tensors"].items():
        now, now_value, now_requires_grad, now_device = after["tensors"][name]
        assert now is tensor, name  # the same tensor: an optimizer may hold it
        assert now.is_meta or torch.equal(now_value, value), name
        assert (now_requires_grad, now_device) == (requires_grad, device), name
    for name, (full, dicts) in before["hooks"].items():
        now_full, now_dicts = after["hooks"][name]
        assert now_full == full, name
        # The same dicts, which the handles that registered the hooks hold.
        for (attr, hooks, entries), (_, now_hooks, now_entries) in zip(dicts, now_dicts):
            assert now_hooks is hooks and now_entries == entries, (name, attr)


@contextlib.contextmanager
def failing_registration(error, at, kind=lx.LowRankLinear):
    """Raise ``error`` instead of registering the ``at``-th module of ``kind`` in
    a module: between two swaps, where a Ctrl-C may arrive."""
    count = 0

    def hook(module, name, submodule):
        nonlocal count
        if isinstance(submodule, kind):
            count += 1
            if count == at:
                raise error("stopped")

    handle = torch_module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def outputs(model):
    ids = torch.arange(10).repeat(4)
    model.eval()
    with torch.no_grad():
        return model(ids)


# --- compress_model ----------------------------------------------------------

@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("sequential", [False, True])
def test_compress_model_stopped_between_swaps(error, sequential):
    model = build(0)
    handles = hooked(model)
    expected = outputs(model)
    before = snapshot(model)
    calibration = [torch.arange(10).repeat(3)] if sequential else None
    with failing_registration(error, at=2), pytest.raises(error, match="^stopped$"):
        lx.compress_model(model, rank=4, calibration=calibration, sequential=sequential,
                          progress=False)
    assert_as_before(model, before)
    assert torch.equal(outputs(model), expected)
    # The handles still reach their hooks.
    for handle in handles:
        handle.remove()
    assert not any(getattr(m, attr) for m in model.modules() for attr in HOOK_ATTRS
                   if hasattr(m, attr))


@pytest.mark.parametrize("error", ERRORS)
def test_compress_model_stopped_in_the_middle_of_a_swap(error, monkeypatch):
    # The second layer is in place, its hooks not yet moved to it.
    model = build(0)
    hooked(model)
    before = snapshot(model)
    move_hooks, calls = _modules.move_hooks, []

    def stopped_once_in(old, new):
        calls.append(old)
        if len(calls) == 2:
            raise error("stopped")
        move_hooks(old, new)

    monkeypatch.setattr(_modules, "move_hooks", stopped_once_in)
    with pytest.raises(error, match="^stopped$"):
        lx.compress_model(model, rank=4, progress=False)
    assert len(calls) == 2
    assert_as_before(model, before)


@pytest.mark.parametrize("error", ERRORS)
def test_compress_model_stopped_while_a_sensitivity_probe_goes_in(error, monkeypatch):
    # The sensitivity allocation puts each layer's truncation in its place for
    # one calibration run: stopped with the probe in place, its hooks not yet
    # moved to it, the probe stayed in the model.
    model = build(0)
    hooked(model)
    before = snapshot(model)
    move_hooks, calls = _modules.move_hooks, []

    def stopped_once_in(old, new):
        calls.append(new)
        if len(calls) == 1:
            raise error("stopped")
        move_hooks(old, new)

    monkeypatch.setattr(_modules, "move_hooks", stopped_once_in)
    with pytest.raises(error, match="^stopped$"):
        lx.compress_model(model, ratio=0.5, calibration=[torch.arange(10).repeat(3)],
                          progress=False)
    assert isinstance(calls[0], lx.LowRankLinear)  # a probe
    assert_as_before(model, before)


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("at", [1, 2])
def test_compress_model_stopped_while_a_sensitivity_probe_is_taken_out(error, at):
    # Stopped as the original goes back in place of its probe: the probe stayed.
    model = build(0)
    hooked(model)
    expected = outputs(model)
    before = snapshot(model)
    with failing_registration(error, at=at, kind=nn.Linear), \
            pytest.raises(error, match="^stopped$"):
        lx.compress_model(model, ratio=0.5, calibration=[torch.arange(10).repeat(3)],
                          progress=False)
    assert_as_before(model, before)
    assert torch.equal(outputs(model), expected)


def test_compress_model_succeeds_after_a_stopped_call():
    model, reference = build(0), build(0)
    with failing_registration(KeyboardInterrupt, at=2), pytest.raises(KeyboardInterrupt):
        lx.compress_model(model, rank=4, progress=False)
    lx.compress_model(model, rank=4, progress=False)
    lx.compress_model(reference, rank=4, progress=False)
    assert torch.equal(outputs(model), outputs(reference))


# --- load_compressed ---------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A compressed Net (other values than build(1)'s) saved to a file."""
    model = build(0)
    lx.compress_model(model, rank=4, progress=False)
    assert {type(model.body[0]), type(model.body[3])} == {lx.LowRankLinear}
    path = tmp_path / "model.safetensors"
    lx.save_compressed(model, path)
    return model, path


@pytest.mark.parametrize("error", ERRORS)
def test_load_compressed_stopped_while_copying(saved, error):
    # A load_state_dict pre-hook of the last module loaded raises: the ones
    # before it (the embedding, the LayerNorm) already hold the file's values.
    source, path = saved
    model = build(1)
    handles = hooked(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = outputs(model)
    before = snapshot(model)

    def stop(*args):
        raise error("stopped")

    model.body[4].register_load_state_dict_pre_hook(stop)
    with pytest.raises(error, match="^stopped$"):
        lx.load_compressed(model, path)
    assert_as_before(model, before)
    assert [p for group in optimizer.param_groups for p in group["params"]] \
        == list(model.parameters())
    assert torch.equal(outputs(model), expected)
    for handle in handles:
        handle.remove()
    # Nothing of the failed call stays behind: loading again works.
    model.body[4]._load_state_dict_pre_hooks.clear()
    lx.load_compressed(model, path)
    assert torch.equal(outputs(model), outputs(source))


@pytest.mark.parametrize("error", ERRORS)
def test_load_compressed_stopped_between_swaps(saved, error):
    _, path = saved
    model = build(1)
    hooked(model)
    before = snapshot(model)
    with failing_registration(error, at=2), pytest.raises(error, match="^stopped$"):
        lx.load_compressed(model, path)
    assert_as_before(model, before)


@pytest.mark.parametrize("error", ERRORS)
def test_load_compressed_into_meta_stopped_while_copying(saved, error):
    # The materialized tensors go back to meta, the real ones (here the
    # BatchNorm's buffers) get their values back.
    _, path = saved
    with torch.device("meta"):
        meta = Net()
    real = build(1).body[4]
    meta.body[4].running_mean = real.running_mean
    meta.body[4].running_var = real.running_var
    before = snapshot(meta)

    def stop(*args):
        raise error("stopped")

    meta.head.register_load_state_dict_pre_hook(stop)
    with pytest.raises(error, match="^stopped$"):
        lx.load_compressed(meta, path)
    assert_as_before(meta, before)
    assert all(p.is_meta for p in meta.parameters())


# --- add_lora and merge_lora -------------------------------------------------

def linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                         nn.Linear(16, 8))


@pytest.mark.parametrize("error", ERRORS)
def test_add_lora_stopped_while_building_puts_back_the_pissa_residuals(error):
    model = linears()
    before = snapshot(model)
    # LoRALinear registers its base as a submodule while it is built.
    with failing_registration(error, 2, nn.Linear), pytest.raises(error):
        lx.add_lora(model, rank=4, include=["0", "2", "4"], init="pissa")
    assert_as_before(model, before)


@pytest.mark.parametrize("error", ERRORS)
def test_add_lora_stopped_between_swaps_puts_back_every_layer(error):
    model = linears()
    model[2].register_forward_hook(lambda m, args, out: out * 2)
    before = snapshot(model)
    with failing_registration(error, 2, lx.LoRALinear), pytest.raises(error):
        lx.add_lora(model, rank=4, include=["0", "2", "4"])
    assert_as_before(model, before)


@pytest.mark.parametrize("error", ERRORS)
def test_merge_lora_stopped_leaves_every_adapter_unmerged_in_place(error):
    model = linears()
    lx.add_lora(model, rank=4, include=["0", "2", "4"])
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, lx.LoRALinear):
                layer.B.normal_()
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x)
    types = [type(m) for m in model]
    weights = {i: m.base.weight.detach().clone() for i, m in enumerate(model)
               if isinstance(m, lx.LoRALinear)}
    with failing_registration(error, 2, nn.Linear), pytest.raises(error):
        lx.merge_lora(model)
    assert [type(m) for m in model] == types
    for i, weight in weights.items():
        assert not model[i].merged
        # unmerge subtracts what merge added: equal to rounding
        torch.testing.assert_close(model[i].base.weight, weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
