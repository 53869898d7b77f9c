"""allocation="sensitivity": layer probes against quantities computed here in float64."""

import collections
import copy
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx
from lowrank_ext.sensitivity import OutputRecorder, relative_change


class TwoBranches(nn.Module):
    """Two layers with the same weight whose outputs reach the result at very different scales."""

    def __init__(self):
        super().__init__()
        self.loud = nn.Linear(24, 24, dtype=torch.float64)
        self.quiet = nn.Linear(24, 24, dtype=torch.float64)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight)
            self.quiet.bias.copy_(self.loud.bias)

    def forward(self, x):
        return torch.cat([10.0 * self.loud(x), 0.1 * self.quiet(x)], dim=-1)


def data():
    return [torch.randn(64, 24, dtype=torch.float64) for _ in range(3)]


def output_change(model, original, batches):
    """‖f'(X) − f(X)‖² / ‖f(X)‖² over the batches, in float64."""
    with torch.no_grad():
        err = sum(float((model(x) - original(x)).pow(2).sum()) for x in batches)
        ref = sum(float(original(x).pow(2).sum()) for x in batches)
    return err / ref


def test_a_single_bias_free_layer_has_sensitivity_one():
    """For y = W·x the model's relative change is the layer's relative error: s = 1."""
    model = nn.Sequential(nn.Linear(24, 12, bias=False, dtype=torch.float64))
    report = lx.compress_model(model, ratio=0.5, calibration=data(), allocation="sensitivity")
    assert report.layers[0].sensitivity == pytest.approx(1.0, rel=1e-9)


def test_with_a_bias_sensitivity_is_the_share_of_wx_in_the_output():
    """With y = W·x + b the same change is measured against ‖W·x + b‖²: s = ‖WX‖² / ‖WX + b‖²."""
    layer = nn.Linear(24, 12, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.fill_(3.0)
    batches = data()
    X = torch.cat(batches)
    with torch.no_grad():
        expected = float((X @ layer.weight.T).pow(2).sum() / layer(X).pow(2).sum())
    report = lx.compress_model(nn.Sequential(layer), ratio=0.5, calibration=batches)
    assert report.layers[0].sensitivity == pytest.approx(expected, rel=1e-9)


def test_the_loud_layer_gets_the_ranks_and_the_output_is_closer():
    original = TwoBranches()
    batches = data()
    by_energy, by_sensitivity = copy.deepcopy(original), copy.deepcopy(original)
    energy_report = lx.compress_model(by_energy, ratio=0.5, calibration=batches,
                                      allocation="global")
    report = lx.compress_model(by_sensitivity, ratio=0.5, calibration=batches)  # the default
    assert energy_report.ranks["loud"] == energy_report.ranks["quiet"]  # same weights
    assert report.ranks["loud"] > report.ranks["quiet"]
    assert report.params_after <= 0.5 * report.params_before
    s = {layer.name: layer.sensitivity for layer in report.layers}
    assert s["loud"] > 1000 * s["quiet"]
    assert (output_change(by_sensitivity, original, batches)
            < 0.5 * output_change(by_energy, original, batches))


def test_outputs_come_from_the_last_child_when_forward_is_called_directly():
    model = nn.Sequential(nn.Linear(16, 32, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(32, 8, dtype=torch.float64))
    x = torch.randn(40, 16, dtype=torch.float64)
    direct, called = copy.deepcopy(model), copy.deepcopy(model)
    # model.forward(x) bypasses the model's own hooks: its children's still run.
    a = lx.compress_model(direct, ratio=0.4, calibration=lambda m: m.forward(x))
    b = lx.compress_model(called, ratio=0.4, calibration=lambda m: m(x))
    assert a.ranks == b.ranks
    assert [r.sensitivity for r in a.layers] == pytest.approx([r.sensitivity for r in b.layers])


def test_nested_outputs_and_wide_outputs_are_recorded():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 200, dtype=torch.float64)

        def forward(self, x):
            h = self.body(x)
            # A Mapping that is not a dict, like transformers' BatchEncoding.
            return collections.UserDict(
                {"logits": h, "parts": (h[:, :3], torch.ones(1, dtype=torch.int64))})

    model = Heads()
    recorder = OutputRecorder(model)
    x = torch.randn(50, 8, dtype=torch.float64)
    first = recorder.record([x])
    assert len(first) == 1 and [t.shape for t in first[0]] == [(50, 64), (50, 3)]
    again = recorder.record([x])
    assert relative_change(first, again) == 0.0
    # The 200 → 64 projection keeps squared distances in expectation: compare
    # with the exact change for a random perturbation (one fixed draw).
    with torch.no_grad():
        before = model.body(x)
        model.body.weight.add_(0.05 * torch.randn_like(model.body.weight))
        after = model.body(x)
    moved = recorder.record([x])

    def rel(new, old):
        return float((new - old).pow(2).sum() / old.pow(2).sum())

    exact = rel(after, before) + rel(after[:, :3], before[:, :3])
    assert relative_change(first, moved) == pytest.approx(exact, rel=0.1)


def test_outputs_in_a_buffer_the_model_overwrites_are_recorded_by_value():
    # A model handing out a buffer it overwrites on every call (a streaming
    # model's state): narrow outputs were recorded as references, which each
    # probe run overwrote, so every change measured 0 and every layer rank 1.
    class Fresh(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 32, dtype=torch.float64)
            self.fc2 = nn.Linear(32, 8, dtype=torch.float64)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    class Stateful(Fresh):
        def __init__(self):
            super().__init__()
            self.register_buffer("state", torch.zeros(64, 8, dtype=torch.float64),
                                 persistent=False)

        def forward(self, x):
            return self.state.copy_(super().forward(x))

    g = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 16, generator=g, dtype=torch.float64) for _ in range(4)]
    reports = []
    for cls in (Fresh, Stateful):
        torch.manual_seed(0)
        reports.append(lx.compress_model(cls(), ratio=0.4, calibration=data, progress=False))
    fresh, stateful = ([(layer.rank, layer.sensitivity) for layer in r.layers] for r in reports)
    assert all(s > 0.01 for _, s in fresh)
    assert stateful == fresh


def test_hooks_the_calibration_changes_on_a_probed_layer_stay_changed():
    # The probe's way back restored the hooks as they were before it went in:
    # a monitor the calibration removed while the layer was probed came back,
    # and a hook it added there was dropped.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(32, 8, dtype=torch.float64))
    seen = []
    monitor = model[2].register_forward_hook(lambda module, args, output: seen.append(1))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    added = []

    def calibration(m):
        for x in data:
            m(x)
        if isinstance(m[2], lx.LowRankLinear) and not added:  # model[2]'s probe run
            monitor.remove()
            added.append(m[2].register_forward_pre_hook(lambda module, args: None))

    lx.compress_model(model, ratio=0.5, calibration=calibration, progress=False)
    assert added
    del seen[:]
    model(data[0])
    assert not seen
    assert added[0].id in model[2]._forward_pre_hooks


def test_a_probed_layer_with_a_weight_norm_hook_keeps_its_hooks_and_handles():
    # Its weight-norm pre-hook stays with the layer while a probe stands in;
    # putting the layer back by moving hooks merged the user's hook into the
    # dict that pre-hook was left in: its handle no longer removed it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(32, 8, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(8, 8, dtype=torch.float64))
    nn.utils.weight_norm(model[2])
    handle = model[2].register_forward_pre_hook(lambda module, args: None)
    before = list(model[2]._forward_pre_hooks.values())
    data = [torch.randn(64, 16, dtype=torch.float64) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lx.compress_model(model, ratio=0.7, calibration=data, progress=False)
    holder = model[2]
    if isinstance(holder, nn.Linear):  # kept: its own hooks as they were
        assert list(holder._forward_pre_hooks.values()) == before
    handle.remove()
    assert not any(h is before[1] for h in holder._forward_pre_hooks.values())


def test_needs_calibration():
    with pytest.raises(ValueError, match="allocation='sensitivity' needs calibration"):
        lx.compress_model(TwoBranches(), ratio=0.5, allocation="sensitivity")


def test_calibration_that_changes_between_runs_is_refused_and_the_model_kept():
    model = TwoBranches()
    sizes = iter(range(1, 100))

    def calibration(m):
        m(torch.randn(next(sizes), 24, dtype=torch.float64))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="outputs of other shapes on a second run"):
        lx.compress_model(model, ratio=0.5, calibration=calibration)
    assert all(type(m) is not lx.LowRankLinear for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_calibration_that_never_runs_the_model_or_its_children():
    model = nn.Sequential()
    model.block = nn.Sequential(nn.Linear(24, 24, dtype=torch.float64), nn.Tanh(),
                                nn.Linear(24, 24, dtype=torch.float64))
    x = torch.randn(10, 24, dtype=torch.float64)
    # block.forward runs the layers (their hooks fire) but neither the model's
    # nor its top-level child's __call__, so there is no output to measure.
    with pytest.raises(ValueError, match="needs a calibration that runs the model"):
        lx.compress_model(model, ratio=0.5, calibration=lambda m: m.block.forward(x))
    assert all(type(m) is not lx.LowRankLinear for m in model.modules())


def test_outputs_without_floating_tensors_are_refused():
    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(24, 24, dtype=torch.float64)

        def forward(self, x):
            return {"labels": self.fc(x).argmax(-1)}

    with pytest.raises(ValueError, match="found no floating-point tensor in the model's outputs"):
        lx.compress_model(Argmax(), ratio=0.5, calibration=data())


def test_padding_tokens_do_not_count_in_the_measured_change():
    # The same two sentences, padded into one batch or one per batch: the
    # model's outputs at real tokens are the same, and only those count, so
    # the sensitivities agree. (Before, the padded rows of the hidden states
    # counted too.)
    _padded_or_not_measures_alike("BertModel", add_pooling_layer=False)


def _padded_or_not_measures_alike(kind, exclude=None, **options):
    """A tiny transformers ``kind`` compressed with two sentences padded into
    one batch, then one per batch, gets the same sensitivities and ranks."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48)
    torch.manual_seed(0)
    model = getattr(transformers, kind)(config, **options).double().eval()
    ids = torch.randint(1, 40, (2, 7))
    mask = torch.tensor([[1] * 3 + [0] * 4, [1] * 7])
    padded = [{"input_ids": ids, "attention_mask": mask}]
    separate = [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]}
                for i, n in enumerate((3, 7))]
    reports = [lx.compress_model(copy.deepcopy(model), ratio=0.5, calibration=batches,
                                 exclude=exclude, progress=False)
               for batches in (padded, separate)]
    for a, b in zip(*(report.layers for report in reports)):
        assert a.sensitivity == pytest.approx(b.sensitivity, rel=1e-6), a.name
    assert reports[0].ranks == reports[1].ranks


def test_padding_of_one_number_per_token_outputs_does_not_count():
    # A question-answering head's start_logits are (batch, tokens), the mask's
    # own shape, with no feature dimension: their padded entries counted.
    _padded_or_not_measures_alike("BertForQuestionAnswering", exclude="qa_outputs")


def test_a_layer_no_rank_saves_anything_on_is_not_probed():
    # A one-output head stays dense whatever its sensitivity: it cost a
    # calibration run, was warned about as "unmeasured" and reported with the
    # others' median.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 1))
    runs = []
    model.register_forward_pre_hook(lambda module, args: runs.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = lx.compress_model(model, ratio=0.5, calibration=[torch.randn(64, 20)],
                                   progress=False)
    head = next(layer for layer in report.layers if layer.name == "2")
    assert head.rank is None and head.sensitivity is None
    assert report.layers[0].sensitivity > 0
    assert len(runs) == 3  # the whitening statistics, the reference, one probe


def test_probes_exact_on_a_tiny_calibration_are_not_measured_but_warned_about():
    # Two calibration rows: every layer's inputs span at most two directions,
    # so each probe (rank >= 2) reproduces the calibration up to rounding and
    # its "sensitivity" would be noise over zero (0 starved a layer to rank 1).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(),
                          nn.Linear(24, 6))
    with pytest.warns(UserWarning, match="span fewer directions than that rank"):
        report = lx.compress_model(model, ratio=0.5, calibration=[torch.randn(2, 16)],
                                   progress=False)
    assert [layer.sensitivity for layer in report.layers] == [1.0, 1.0, 1.0]
    assert min(report.ranks.values()) > 1
