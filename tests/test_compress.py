"""compress_model on tiny random models, against float64 references computed here."""

import collections
import contextlib
import copy
import json
import math

import pytest
import torch
from torch import nn

import lowrank_ext as lx


class Net(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.encoder = nn.ModuleDict({
            "fc1": nn.Linear(16, 32, dtype=dtype),
            "fc2": nn.Linear(32, 24, dtype=dtype),
        })
        self.head = nn.Linear(24, 6, bias=False, dtype=dtype)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, scale=1.0):
        h = torch.relu(self.encoder["fc1"](x * scale))
        h = torch.relu(self.encoder["fc2"](self.drop(h)))
        return self.head(h)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: m.training for n, m in model.named_modules()})


def _assert_unchanged(model, snapshot):
    state, types, modes = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert set(model.state_dict()) == set(state)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True)
    for module in model.modules():
        assert not module._forward_pre_hooks


def _layer_inputs(model, x):
    """{name: the inputs each Linear sees}, captured independently of compress_model."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(
        a[0].detach().reshape(-1, a[0].shape[-1])))
        for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_plain_svd_factors_are_the_truncated_svd():
    model = Net()
    original = copy.deepcopy(model)
    report = lx.compress_model(model, rank=3)
    for name in ("encoder.fc1", "encoder.fc2", "head"):
        layer, dense = model.get_submodule(name), original.get_submodule(name)
        assert isinstance(layer, lx.LowRankLinear) and layer.rank == 3
        U, S, Vh = torch.linalg.svd(dense.weight.detach())
        torch.testing.assert_close(layer.B @ layer.A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])
        expected = float(S[3:].square().sum().sqrt() / S.square().sum().sqrt())
        row = next(r for r in report.layers if r.name == name)
        assert row.weight_error == pytest.approx(expected, rel=1e-9)
        assert row.output_error is None
        assert row.params_after == 3 * sum(dense.weight.shape)
    assert model.head.bias is None
    torch.testing.assert_close(model.encoder["fc1"].bias, original.encoder["fc1"].bias)


def test_calibrated_truncation_minimises_output_error():
    model = Net()
    original = copy.deepcopy(model)
    x = torch.randn(200, 16, dtype=torch.float64)
    inputs = _layer_inputs(original, x)
    report = lx.compress_model(model, rank=4, calibration=[x])
    for name in ("encoder.fc1", "encoder.fc2", "head"):
        W = original.get_submodule(name).weight.detach()
        X = inputs[name]
        # Independent reference (SVD-LLM): Cholesky factor L of XᵀX, truncated
        # SVD of W·L, mapped back with L⁻¹.
        gram = X.T @ X
        L = torch.linalg.cholesky(gram + 1e-10 * gram.diagonal().mean() * torch.eye(len(gram),
                                                                                    dtype=W.dtype))
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        best = U[:, :4] @ torch.diag(S[:4]) @ torch.linalg.solve_triangular(
            L, Vh[:4], upper=False, left=False)
        layer = model.get_submodule(name)
        got = (layer.B @ layer.A).detach()
        err_got = torch.linalg.matrix_norm(X @ (W - got).T)
        err_best = torch.linalg.matrix_norm(X @ (W - best).T)
        assert float(err_got) <= float(err_best) * (1 + 1e-6)
        torch.testing.assert_close(got @ gram @ got.T, best @ gram @ best.T, rtol=1e-6, atol=1e-6)
        # The report's output error is the measured one on the calibration inputs.
        row = next(r for r in report.layers if r.name == name)
        measured = float(err_got / torch.linalg.matrix_norm(X @ W.T))
        assert row.output_error == pytest.approx(measured, rel=1e-6)
        plain_layer = lx.LowRankLinear.from_linear(original.get_submodule(name), rank=4)
        plain = float(torch.linalg.matrix_norm(X @ (W - plain_layer.B @ plain_layer.A).T.detach()))
        assert float(err_got) <= plain * (1 + 1e-9)


def test_calibration_with_singular_gram_has_no_nan():
    # 5 samples for 16 features: XᵀX is singular, no Cholesky factor exists.
    model = Net()
    x = torch.randn(5, 16, dtype=torch.float64)
    ref = Net.forward(copy.deepcopy(model).eval(), x)
    report = lx.compress_model(model, rank=5, include="fc1", calibration=[x])
    assert all(math.isfinite(r.weight_error) for r in report.layers)
    model.eval()
    # Rank 5 covers the span of 5 samples: the layer is exact on them.
    torch.testing.assert_close(model(x), ref)


def test_ratio_uniform_and_global_budgets():
    model = Net()
    shapes = {"encoder.fc1": (32, 16), "encoder.fc2": (24, 32), "head": (6, 24)}
    uniform = lx.compress_model(copy.deepcopy(model), ratio=0.5, allocation="uniform")
    for row in uniform.layers:
        d, k = shapes[row.name]
        assert row.rank == math.floor(0.5 * d * k / (d + k))
    assert uniform.ratio <= 0.5
    x = torch.randn(100, 16, dtype=torch.float64)
    for calibration in (None, [x]):
        report = lx.compress_model(copy.deepcopy(model), ratio=0.5, calibration=calibration)
        assert report.params_after <= 0.5 * report.params_before
        assert report.params_after > 0.4 * report.params_before  # the budget is used


def test_global_allocation_favours_the_layer_that_needs_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40, dtype=torch.float64),
                          nn.Linear(40, 40, dtype=torch.float64))
    with torch.no_grad():  # layer 0 has rank 2, layer 1 is full rank
        model[0].weight.copy_(torch.randn(40, 2, dtype=torch.float64)
                              @ torch.randn(2, 40, dtype=torch.float64))
    uniform = lx.compress_model(copy.deepcopy(model), ratio=0.3, allocation="uniform")
    report = lx.compress_model(model, ratio=0.3)
    ranks = report.ranks
    assert ranks["0"] <= 3 < ranks["1"]
    assert report.params_after <= 0.3 * report.params_before
    total = lambda r: sum(row.weight_error ** 2 for row in r.layers)  # noqa: E731
    assert total(report) < total(uniform)


class TwoBranches(nn.Module):
    """Outputs a(x) beside b(x), both 12 → 16: a has orthonormal columns (a
    flat spectrum: rank r keeps r/12 of it for 28·r parameters, its 192 dense
    weights all of it; break-even 6.9), b has rank 1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16, dtype=torch.float64)
        self.b = nn.Linear(12, 16, dtype=torch.float64)
        with torch.no_grad():
            self.a.weight.copy_(torch.linalg.qr(torch.randn(16, 12, dtype=torch.float64)).Q)
            self.b.weight.copy_(torch.randn(16, 1, dtype=torch.float64)
                                @ torch.randn(1, 12, dtype=torch.float64))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], -1)


def test_sensitivity_allocation_keeps_a_layer_whole_where_that_keeps_more_per_parameter():
    # A budget of 0.6·384 holds a dense a (192) beside b at rank 1 (28); a
    # prefix of a's ranks alone stops below break-even, at rank 6 (168),
    # keeping half of it.
    torch.manual_seed(0)
    model = TwoBranches()
    weight = model.a.weight.detach().clone()
    x = torch.randn(64, 12, dtype=torch.float64)
    expected = model(x)
    # (b's rank-1 weight truncated at its probe rank computes the same.)
    with pytest.warns(UserWarning, match=r"sensitivity of layer\(s\) b cannot be measured"):
        report = lx.compress_model(model, ratio=0.6, calibration=[x], progress=False)
    assert report.params_after <= 0.6 * report.params_before
    row = {r.name: r for r in report.layers}["a"]
    assert row.rank is None and row.params_after == 192 and row.output_error == 0.0
    assert "kept whole by the sensitivity allocation" in row.note
    assert type(model.a) is nn.Linear and torch.equal(model.a.weight, weight)
    assert isinstance(model.b, lx.LowRankLinear) and model.b.rank == 1
    torch.testing.assert_close(model(x), expected)
    # By each layer's own error, a prefix only (see allocate_ranks).
    model = TwoBranches()
    report = lx.compress_model(model, ratio=0.6, calibration=[x], allocation="global")
    assert isinstance(model.a, lx.LowRankLinear) and model.a.rank == 6


def test_a_layer_grown_to_break_even_is_not_said_to_be_kept_whole():
    # 8×8 grows rank by rank to d·k/(d+k) = 4, where it stays dense: the
    # global allocation makes no whole-layer offer.
    x = torch.randn(32, 8, dtype=torch.float64)
    for calibration in (None, [x]):
        report = lx.compress_model(nn.Sequential(nn.Linear(8, 8, dtype=torch.float64)),
                                   ratio=1.0, calibration=calibration, allocation="global")
        assert report.layers[0].note == "dense: rank 4 >= d·k/(d+k) = 4.0 saves nothing"


# (b truncated at its probe rank computes the same: its sensitivity cannot be measured.)
@pytest.mark.filterwarnings("ignore:compress_model. the sensitivity of layer")
@pytest.mark.parametrize("allocation", ["sensitivity", "global"])
def test_ranks_past_a_low_rank_weight_are_not_given(allocation):
    # b is exactly rank 2: its energies past that are eigh's round-off, and
    # further ranks (or keeping it whole) would keep nothing but spend the
    # budget's leftovers.
    torch.manual_seed(0)
    model = TwoBranches()
    with torch.no_grad():
        model.a.weight.normal_()
        model.b.weight.copy_(torch.randn(16, 2, dtype=torch.float64)
                             @ torch.randn(2, 12, dtype=torch.float64))
    x = torch.randn(64, 12, dtype=torch.float64)
    expected = model(x)
    for ratio in (0.8, 1.0):
        trial = copy.deepcopy(model)
        report = lx.compress_model(trial, ratio=ratio, calibration=[x], allocation=allocation,
                                   progress=False)
        assert report.ranks["b"] == 2 and isinstance(trial.b, lx.LowRankLinear)
        torch.testing.assert_close(trial(x)[:, 16:], expected[:, 16:])


class _Energies:
    """What allocate_ranks reads of a spectrum."""

    def __init__(self, energy):
        self.energy = torch.tensor(energy, dtype=torch.float64)
        self.total = float(self.energy.sum())


def test_allocation_takes_a_whole_layer_only_where_it_fits_and_pays():
    from lowrank_ext.rank_choice import allocate_ranks
    flat, steep = _Energies([1.0] * 8), _Energies([100.0] + [1e-3] * 7)
    shapes = {"flat": (8, 8), "steep": (8, 8)}
    spectra = {"flat": flat, "steep": steep}
    # 0.7·128 holds the flat layer dense (64) beside the steep one at rank 1
    # (16); without whole layers, the flat one's prefix stops at break-even.
    assert allocate_ranks(spectra, shapes, 0.7, whole_layers=True) == {"flat": 8, "steep": 1}
    assert allocate_ranks(spectra, shapes, 0.7) == {"flat": 4, "steep": 1}
    # 0.6·128 does not: its prefix stops where the budget does.
    assert allocate_ranks(spectra, shapes, 0.6, whole_layers=True) == {"flat": 3, "steep": 1}
    # With room for everything, a layer whose energy runs past its break-even
    # rank is kept whole, one whose energy ends before it is not.
    ranks = allocate_ranks({"a": steep, "b": _Energies([4.0, 2.0, 1.0, 1.0, 0, 0, 0, 0])},
                           {"a": (8, 8), "b": (8, 8)}, 1.0, whole_layers=True)
    assert ranks == {"a": 8, "b": 4}
    # A spectrum with no energy past its prefix is never made whole.
    ranks = allocate_ranks({"a": _Energies([1.0, 0, 0, 0, 0, 0, 0, 0])}, {"a": (8, 8)}, 1.0,
                           whole_layers=True)
    assert ranks == {"a": 1}


class Wide(nn.Module):
    """Layers wide enough for ranks in blocks of 8: 64×96, 96×64, 48×96."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(96, 64, dtype=torch.float64)
        self.b = nn.Linear(64, 96, dtype=torch.float64)
        self.c = nn.Linear(96, 48, dtype=torch.float64)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("allocation, calibrated", [
    ("uniform", False), ("global", False), ("global", True), ("sensitivity", True)])
def test_rank_multiple_keeps_every_rank_a_multiple_within_the_budget(allocation, calibrated):
    torch.manual_seed(0)
    model = Wide()
    calibration = [torch.randn(200, 96, dtype=torch.float64)] if calibrated else None
    plain = lx.compress_model(copy.deepcopy(model), ratio=0.4, allocation=allocation,
                              calibration=calibration)
    report = lx.compress_model(model, ratio=0.4, allocation=allocation,
                               calibration=calibration, rank_multiple=8)
    assert any(r % 8 for r in plain.ranks.values())  # the rounding has work to do
    assert report.ranks and all(r % 8 == 0 for r in report.ranks.values())
    assert all(model.get_submodule(n).rank == r for n, r in report.ranks.items())
    assert report.params_after <= 0.4 * report.params_before
    # Within one block of each layer of what the budget allows.
    assert report.params_after > 0.4 * report.params_before - 8 * (64 + 96 + 96 + 64 + 48 + 96)
    if allocation == "uniform":
        assert report.ranks == {n: 8 * (r // 8) for n, r in plain.ranks.items()}


def test_rank_multiple_rounds_energy_and_tol_up_and_checks_rank():
    model = Wide()
    for target in (dict(energy=0.7), dict(tol=0.6)):
        plain = lx.compress_model(copy.deepcopy(model), **target)
        report = lx.compress_model(copy.deepcopy(model), rank_multiple=16, **target)
        for row in report.layers:
            expected = min(-(-plain.ranks[row.name] // 16) * 16, min(row.shape))
            d, k = row.shape
            if expected >= d * k / (d + k):  # rounded up past break-even: dense
                assert row.rank is None and "saves nothing" in row.note
                continue
            assert row.rank == expected
            if "tol" in target:
                assert row.weight_error <= 0.6  # rounding up keeps the guarantee
        assert report.ranks and report.ranks != plain.ranks
    assert lx.compress_model(copy.deepcopy(model), rank=16, rank_multiple=8).ranks == {
        "a": 16, "b": 16, "c": 16}
    for bad, error, match in [
            (dict(rank=12, rank_multiple=8), ValueError,
             "rank 12 is not a multiple of rank_multiple 8"),
            (dict(ratio=0.5, rank_multiple=0), ValueError, "rank_multiple must be a positive int"),
            (dict(ratio=0.5, rank_multiple=2.0), ValueError, "rank_multiple must be a positive"),
            (dict(ratio=0.5, rank_multiple=True), ValueError, "got True")]:
        snapshot = _snapshot(model)
        with pytest.raises(error, match=match):
            lx.compress_model(model, **bad)
        _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("kwargs, match", [
    # head is 6×24: break-even 4.8, less than one block of 8
    (dict(ratio=0.9, allocation="uniform"), "layer 'head' \\(6×24\\) cannot be factorized in "
                                            "blocks of 8 ranks"),
    (dict(ratio=0.9, exclude="head", allocation="uniform"),
     # fc1 is 32×16: ratio 0.5 gives rank 5
     None),
    (dict(ratio=0.5, exclude="head", allocation="uniform"),
     "ratio 0.5 gives layer 'encoder.fc1' \\(32×16\\) rank 5, less than one block"),
    (dict(ratio=0.3, exclude="head", allocation="global"),
     "ratio 0.3 is too small: one block of 8 ranks per layer already keeps 0.650 of the "
     "weights"),
])
def test_a_ratio_too_small_for_one_block_is_refused_before_any_change(kwargs, match):
    model = Net()
    snapshot = _snapshot(model)
    if match is None:  # the same layers with room for a block: no error
        report = lx.compress_model(model, rank_multiple=8, **kwargs)
        assert report.ranks == {"encoder.fc1": 8, "encoder.fc2": 8}
        assert report.params_after <= 0.9 * report.params_before
        return
    with pytest.raises(ValueError, match=match):
        lx.compress_model(model, rank_multiple=8, **kwargs)
    _assert_unchanged(model, snapshot)


def test_layers_that_save_nothing_stay_dense():
    model = Net()
    report = lx.compress_model(model, rank=5)
    # head is 6x24: break-even 4.8, so rank 5 saves nothing.
    assert type(model.head) is nn.Linear
    row = next(r for r in report.layers if r.name == "head")
    assert row.rank is None and row.params_after == row.params_before == 144
    assert "saves nothing" in row.note and "saves nothing" in str(report)
    assert isinstance(model.encoder["fc1"], lx.LowRankLinear)
    # ratio 1.0 on a square layer of even size: the break-even rank itself.
    square = nn.Sequential(nn.Linear(8, 8))
    report = lx.compress_model(square, ratio=1.0)
    assert type(square[0]) is nn.Linear and report.ratio == 1.0


class TiedNet(nn.Module):
    """An output layer sharing the embedding matrix, and one Linear used under two names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16, dtype=torch.float64)
        self.fc = nn.Linear(16, 32, dtype=torch.float64)
        self.proj = nn.Linear(32, 16, dtype=torch.float64)
        self.proj_again = self.proj
        self.lm_head = nn.Linear(16, 50, bias=False, dtype=torch.float64)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.proj(torch.relu(self.fc(self.embed(ids))))
        return self.lm_head(self.proj_again(torch.relu(self.fc(h))))


def _parameter_count(model):
    return sum(p.numel() for p in model.parameters())  # shared tensors once


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("kwargs", [dict(ratio=0.5), dict(rank=3), dict(energy=0.5)])
def test_tied_and_shared_layers_stay_dense(kwargs, calibrated):
    model = TiedNet()
    before = _parameter_count(model)
    ids = torch.randint(0, 50, (4, 7))
    calibration = [ids] if calibrated else None
    report = lx.compress_model(model, calibration=calibration, **kwargs)
    # The tie and the shared module survive, and nothing grew.
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    assert type(model.proj) is nn.Linear and model.proj_again is model.proj
    assert isinstance(model.fc, lx.LowRankLinear)
    assert _parameter_count(model) < before
    rows = {row.name: row for row in report.layers}
    assert set(rows) == {"fc", "proj", "lm_head"}
    assert rows["lm_head"].rank is None and "tied to embed.weight" in rows["lm_head"].note
    assert rows["proj"].rank is None and "also at proj_again" in rows["proj"].note
    assert rows["lm_head"].params_after == rows["lm_head"].params_before == 800
    assert "tied to embed.weight" in str(report)
    if "ratio" in kwargs:  # the budget is fc's alone
        assert rows["fc"].params_after <= 0.5 * rows["fc"].params_before
    # Only tied layers selected: nothing changes, and the report says why.
    model = TiedNet()
    snapshot = _snapshot(model)
    report = lx.compress_model(model, include="lm_head", calibration=calibration, **kwargs)
    _assert_unchanged(model, snapshot)
    assert model.lm_head.weight is model.embed.weight
    assert report.ranks == {} and report.ratio == 1.0


def test_energy_and_tol_targets():
    model = Net()
    original = copy.deepcopy(model)
    report = lx.compress_model(model, tol=0.5)
    for row in report.layers:
        if row.rank is not None:
            assert row.weight_error <= 0.5
            S = torch.linalg.svdvals(original.get_submodule(row.name).weight.detach())
            assert row.rank == lx.choose_rank(S, tol=0.5)
    report = lx.compress_model(copy.deepcopy(original), energy=0.6, include="fc2")
    S = torch.linalg.svdvals(original.encoder["fc2"].weight.detach())
    assert report.layers[0].rank == lx.choose_rank(S, energy=0.6)


def test_include_exclude_patterns():
    model = Net()
    report = lx.compress_model(model, rank=2, include="encoder.*", exclude=["fc2"])
    assert [r.name for r in report.layers] == ["encoder.fc1"]
    assert type(model.encoder["fc2"]) is nn.Linear and type(model.head) is nn.Linear
    report = lx.compress_model(Net(), rank=2, include=["fc1", "head"])
    assert [r.name for r in report.layers] == ["encoder.fc1", "head"]


@pytest.mark.parametrize("batches", [
    lambda x: [x, x[:10]],
    lambda x: [(x,), (x, 2.0)],
    lambda x: [{"x": x, "scale": 0.5}],
    lambda x: [collections.UserDict({"x": x, "scale": 0.5})],  # like a BatchEncoding
    lambda x: (lambda model: model(x)),
])
def test_calibration_forms(batches):
    model = Net()
    x = torch.randn(30, 16, dtype=torch.float64)
    report = lx.compress_model(model, rank=3, calibration=batches(x))
    assert report.calibrated and all(r.output_error is not None for r in report.layers)


def test_calibration_runs_in_eval_mode_and_restores_modes():
    model = Net().train()
    model.head.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    seen = []
    lx.compress_model(model, rank=3, calibration=lambda m: seen.append(m.training) or m(
        torch.randn(8, 16, dtype=torch.float64)))
    assert seen == [False]
    assert {n: m.training for n, m in model.named_modules()} == modes


class Boom(Exception):
    pass


def _raises(model):
    model(torch.randn(4, 16, dtype=torch.float64))
    raise Boom("the data loader broke")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ratio=0.0), ValueError, "ratio must be in \\(0, 1\\]"),
    (dict(ratio=1.5), ValueError, "ratio"),
    (dict(ratio=-1), ValueError, "ratio"),
    (dict(rank=0), ValueError, "rank must be >= 1"),
    (dict(rank=2.5), TypeError, "rank must be an int"),
    (dict(rank=2, ratio=0.5), ValueError, "exactly one"),
    (dict(), ValueError, "exactly one"),
    (dict(energy=0.0), ValueError, "energy"),
    (dict(tol=-0.1), ValueError, "tol"),
    (dict(rank=2, include="nope"), ValueError, "include pattern 'nope' matches no layer"),
    (dict(rank=2, exclude=["fc1", "nope*"]), ValueError, "exclude pattern 'nope\\*'"),
    (dict(rank=2, include="fc1", exclude="fc1"), ValueError, "leave no layer"),
    (dict(ratio=0.5, allocation="best"), ValueError, "allocation must be"),
    (dict(rank=2, allocation="global"), ValueError,
     "allocation applies to ratio only, got allocation='global' with rank"),
    (dict(tol=0.1, allocation="uniform"), ValueError, "with tol"),
    (dict(rank=2, calibration=_raises), RuntimeError,
     "calibration raised Boom: the data loader broke"),
    (dict(rank=2, calibration=[torch.randn(4, 5, dtype=torch.float64)]), RuntimeError,
     "calibration raised"),
    (dict(rank=2, calibration=torch.randn(4, 16)), TypeError, "wrap it in a list"),
    (dict(rank=2, calibration=["text"]), TypeError, "batch must be a tensor"),
    (dict(rank=2, calibration=42), TypeError, "calibration must be a callable"),
    (dict(rank=2, calibration=lambda m: None), ValueError, "never ran layer"),
])
def test_bad_input_leaves_the_model_as_it_was(kwargs, error, match):
    model = Net().train()
    snapshot = _snapshot(model)
    with pytest.raises(error, match=match):
        lx.compress_model(model, **kwargs)
    _assert_unchanged(model, snapshot)


def test_calibration_error_keeps_its_cause():
    with pytest.raises(RuntimeError) as info:
        lx.compress_model(Net(), rank=2, calibration=_raises)
    assert isinstance(info.value.__cause__, Boom)


def test_nan_weight_is_refused_before_any_swap():
    model = Net()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="'head' has NaN"):
        lx.compress_model(model, rank=2)
    _assert_unchanged(model, snapshot)


def test_a_model_on_the_meta_device_is_refused_by_name():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match="layer\\(s\\) encoder.fc1, encoder.fc2, head are on "
                                         "the meta device: their weights hold no values"):
        lx.compress_model(model, ratio=0.5)
    assert not any(isinstance(m, lx.LowRankLinear) for m in model.modules())


def test_not_a_module_and_no_linear():
    with pytest.raises(TypeError, match="nn.Module"):
        lx.compress_model(object(), rank=2)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lx.compress_model(nn.Sequential(nn.ReLU()), rank=2)


def test_a_bare_linear_is_refused_unchanged():
    layer = nn.Linear(8, 6, dtype=torch.float64)
    weight = layer.weight.detach().clone()
    with pytest.raises(TypeError, match="itself an nn.Linear.*from_linear"):
        lx.compress_model(layer, rank=2)
    assert torch.equal(layer.weight, weight)


def test_lora_base_layers_are_left_alone():
    model = Net()
    model.head = lx.LoRALinear(model.head, 2)
    report = lx.compress_model(model, rank=2)
    assert report.ranks == {"encoder.fc1": 2, "encoder.fc2": 2}
    assert type(model.head.base) is nn.Linear
    fresh = Net()
    fresh.head = lx.LoRALinear(fresh.head, 2)
    with pytest.raises(ValueError, match="'head.base' matches no layer"):
        lx.compress_model(fresh, rank=2, include="head.base")


def test_report_table_and_dict():
    model = Net()
    x = torch.randn(50, 16, dtype=torch.float64)
    report = lx.compress_model(model, ratio=0.5, calibration=[x])
    data = json.loads(report.to_json())
    assert data["totals"]["params_before"] == 32 * 16 + 24 * 32 + 6 * 24
    assert data["totals"]["params_after"] == sum(l["params_after"] for l in data["layers"])
    assert data["totals"]["ratio"] == pytest.approx(report.ratio)
    assert [l["name"] for l in data["layers"]] == ["encoder.fc1", "encoder.fc2", "head"]
    assert data["layers"][0]["shape"] == [32, 16]
    text = str(report)
    for word in ("encoder.fc1", "head", "total", "output err", "weight err"):
        assert word in text
    assert report.ranks == {l["name"]: l["rank"] for l in data["layers"] if l["rank"]}


def test_float32_model_keeps_dtype_and_trains():
    model = Net(dtype=torch.float32)
    lx.compress_model(model, ratio=0.5, calibration=[torch.randn(40, 16)])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = model(torch.randn(3, 16))
    out.sum().backward()
    assert model.encoder["fc1"].A.grad is not None


def test_calibration_under_inference_mode_and_shared_inputs():
    # q, k, v style: three layers fed the same tensor, run under inference_mode
    # (as sentence-transformers' encode does); each batch must count once per layer.
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(12, 12, dtype=torch.float64) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) * self.v(x)

    model = Attention()
    original = copy.deepcopy(model)
    xs = [torch.randn(20, 12, dtype=torch.float64) for _ in range(3)]

    def calibration(m):
        with torch.inference_mode():
            for x in xs:
                m(x)

    report = lx.compress_model(model, rank=3, calibration=calibration)
    X = torch.cat(xs)
    for row in report.layers:
        W = original.get_submodule(row.name).weight.detach()
        layer = model.get_submodule(row.name)
        M = (layer.B @ layer.A).detach()
        expected = torch.linalg.matrix_norm(X @ (W - M).T) / torch.linalg.matrix_norm(X @ W.T)
        assert row.output_error == pytest.approx(float(expected), rel=1e-6)
        # and it is the optimum for XᵀX over the three batches
        U, S, _ = torch.linalg.svd(W @ torch.linalg.cholesky(X.T @ X), full_matrices=False)
        assert row.output_error == pytest.approx(
            float(S[3:].square().sum().sqrt() / S.square().sum().sqrt()), rel=1e-6)


def test_sequential_whitens_with_the_compressed_inputs():
    model = nn.Sequential(nn.Linear(10, 10, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(10, 10, dtype=torch.float64))
    original = copy.deepcopy(model)
    x = torch.randn(60, 10, dtype=torch.float64)
    report = lx.compress_model(model, rank=3, calibration=[x], sequential=True)
    assert [r.name for r in report.layers] == ["0", "2"]
    # Independent reference: layer 2 whitened by the inputs the compressed
    # layer 0 produces, through the SVD of W·L (Cholesky).
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        W = original[2].weight
        L = torch.linalg.cholesky(h.T @ h)
        U, S, Vh = torch.linalg.svd(W @ L)
        best = U[:, :3] @ torch.diag(S[:3]) @ torch.linalg.solve_triangular(
            L, Vh[:3], upper=False, left=False)
        torch.testing.assert_close(model[2].B @ model[2].A, best, rtol=1e-6, atol=1e-8)


def test_sequential_failure_restores_the_model():
    model = Net()
    snapshot = _snapshot(model)
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 2:  # the first sequential re-run
            raise Boom("second pass")
        m(torch.randn(30, 16, dtype=torch.float64))

    with pytest.raises(RuntimeError, match="second pass"):
        lx.compress_model(model, rank=3, calibration=flaky, sequential=True)
    _assert_unchanged(model, snapshot)
    with pytest.raises(ValueError, match="sequential=True needs calibration"):
        lx.compress_model(model, rank=3, sequential=True)


@pytest.mark.parametrize("target", [dict(tol=0.2), dict(energy=0.99)], ids=["tol", "energy"])
def test_sequential_targets_hold_for_the_inputs_the_compressed_model_gives(target):
    """With sequential=True, tol and energy choose each layer's rank from the inputs
    the compressed stages before it give: the smallest rank meeting the target there
    (they took the first pass's ranks, from the dense model's inputs: 10 where 7 meets
    tol=0.2, and on other data too few)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(24, 64, dtype=torch.float64))
    original = copy.deepcopy(model)
    # Inputs on a few strong directions: compressing layer 0 moves layer 2's inputs.
    x = torch.randn(400, 24, dtype=torch.float64) * torch.logspace(1, -2, 24,
                                                                   dtype=torch.float64)
    report = lx.compress_model(model, calibration=[x], sequential=True, progress=False, **target)
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        W = original[2].weight
        L = torch.linalg.cholesky(h.T @ h)
        S = torch.linalg.svdvals(W @ L)
        energy = S.square().cumsum(0) / S.square().sum()
        # The smallest rank meeting the target for these inputs, computed here.
        if "tol" in target:
            best = int(((1 - energy).clamp_min(0).sqrt() > target["tol"]).sum()) + 1
        else:
            best = int((energy < target["energy"]).sum()) + 1
        row = {r.name: r for r in report.layers}["2"]
        assert row.rank == best
        error = torch.linalg.matrix_norm(h @ (W - model[2].B @ model[2].A).T) / \
            torch.linalg.matrix_norm(h @ W.T)
        assert row.output_error == pytest.approx(float(error), rel=1e-6)
        if "tol" in target:
            assert float(error) <= target["tol"]


@pytest.mark.parametrize("sequential", [False, True])
def test_the_progress_bar_counts_every_step_and_is_closed_on_failure(sequential, monkeypatch):
    import tqdm.auto

    from recording_bar import RecordingBar

    monkeypatch.setattr(RecordingBar, "made", [])
    bars = RecordingBar.made
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    x = torch.randn(30, 16, dtype=torch.float64)
    for allocation in ("uniform", "global", "sensitivity"):
        lx.compress_model(Net(), ratio=0.5, allocation=allocation, calibration=[x],
                          sequential=sequential, progress=True)
        assert bars[-1].closed and bars[-1].n == bars[-1].total, allocation
    lx.compress_model(Net(), tol=0.2, calibration=[x], sequential=sequential, progress=True)
    assert bars[-1].closed and bars[-1].n == bars[-1].total
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 2:
            raise Boom("second run")
        m(x)

    with pytest.raises(RuntimeError, match="second run"):
        lx.compress_model(Net(), ratio=0.5, allocation="sensitivity", calibration=flaky,
                          sequential=sequential, progress=True)
    assert bars[-1].closed


class TokenNet(nn.Module):
    """A (batch, tokens, features) model that takes an attention_mask like a transformer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32, dtype=torch.float64)
        self.fc2 = nn.Linear(32, 8, dtype=torch.float64)

    def forward(self, x, attention_mask):
        return self.fc2(torch.relu(self.fc1(x))) * attention_mask[..., None]


def test_padding_tokens_are_left_out_of_dict_batch_calibration():
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    padded = x.clone()
    padded[mask == 0] = 1e3  # padding activations that would dominate XᵀX
    original = TokenNet()
    masked, unpadded, polluted = (copy.deepcopy(original) for _ in range(3))
    lx.compress_model(masked, rank=3,
                      calibration=[{"x": padded, "attention_mask": mask}])
    # The same statistics from the real tokens alone, as one flat batch.
    real = x[mask.bool()]
    lx.compress_model(unpadded, rank=3, calibration=lambda m: (m.fc2(torch.relu(m.fc1(real)))))
    for name in ("fc1", "fc2"):
        a, b = getattr(masked, name), getattr(unpadded, name)
        torch.testing.assert_close(a.B @ a.A, b.B @ b.A, rtol=1e-9, atol=1e-9)
    # Without the mask the padding takes over fc1's whitening.
    lx.compress_model(polluted, rank=3,
                      calibration=[{"x": padded, "attention_mask": torch.ones_like(mask)}])
    assert not torch.allclose(polluted.fc1.B @ polluted.fc1.A, masked.fc1.B @ masked.fc1.A,
                              atol=1e-3)


@pytest.mark.parametrize("dtype, stored", [(torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32),
                                           (torch.float64, torch.float64)])
def test_spectra_hold_no_more_than_the_useful_directions(dtype, stored):
    """A layer's spectrum keeps U up to the break-even rank and no copy of the weight."""
    from lowrank_ext.spectra import Spectrum

    weight = torch.randn(40, 24, dtype=torch.float64).to(dtype)
    spectrum = Spectrum(weight, None)
    useful = math.floor(40 * 24 / (40 + 24))  # 15
    assert spectrum.U.shape == (40, useful) and spectrum.U.dtype == stored
    assert spectrum.energy.numel() == 24  # every singular value, for the rank choice
    assert not any(v is not weight and torch.is_tensor(v) and v.shape == weight.shape
                   for v in vars(spectrum).values())
    B, A = spectrum.factors(useful)
    U, S, Vh = torch.linalg.svd(weight.double())
    best = U[:, :useful] @ torch.diag(S[:useful]) @ Vh[:useful]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(B @ A, best, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="beyond the 15 kept directions"):
        spectrum.factors(useful + 1)


def test_a_loader_of_input_label_pairs_gets_a_hint():
    from torch.utils.data import DataLoader, TensorDataset

    model = nn.Sequential(nn.Linear(16, 32, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(32, 6, dtype=torch.float64))
    snapshot = _snapshot(model)
    loader = DataLoader(TensorDataset(torch.randn(16, 16, dtype=torch.float64),
                                      torch.randint(0, 3, (16,))), batch_size=4)
    with pytest.raises(RuntimeError, match=r"calibration raised TypeError: .*positional "
                                           r"argument.*called as model\(\*batch\); for \(input, "
                                           r"label\) pairs give the inputs alone"):
        lx.compress_model(model, ratio=0.5, calibration=loader)
    _assert_unchanged(model, snapshot)
    lx.compress_model(model, ratio=0.5, calibration=[x for x, _ in loader])


def test_frozen_layers_stay_frozen():
    model = Net()
    model.encoder["fc1"].requires_grad_(False)
    model.encoder["fc2"].bias.requires_grad_(False)
    lx.compress_model(model, rank=3)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags == {"encoder.fc1.A": False, "encoder.fc1.B": False, "encoder.fc1.bias": False,
                     "encoder.fc2.A": True, "encoder.fc2.B": True, "encoder.fc2.bias": False,
                     "head.A": True, "head.B": True}
    # distill trains the factors all the same, and gives the flags back.
    teacher = Net()
    lx.distill(model, teacher, [torch.randn(4, 16, dtype=torch.float64)], steps=1,
               progress=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("poison", ["nan", "overflow"])
def test_calibration_inputs_that_are_not_finite_are_named(poison, sequential):
    model = Net()
    snapshot = _snapshot(model)
    x = torch.randn(20, 16, dtype=torch.float64)
    if poison == "nan":
        x[3, 5] = float("nan")
    else:
        x = x * 1e200  # finite, but XᵀX overflows float64
    with pytest.raises(ValueError, match="compress_model: the calibration gave layer\\(s\\) "
                                         "encoder.fc1(, [a-z0-9.]+)* inputs with NaN or Inf"):
        lx.compress_model(model, ratio=0.5, calibration=[x], sequential=sequential)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("allocation", ["uniform", "global", "sensitivity"])
def test_a_ratio_below_rank_one_per_layer_is_refused_not_overrun(allocation):
    # Rank 1 of fc1 (32×16), fc2 (24×32) and head (6×24) keeps 0.094 of the
    # weights: a ratio of 0.01 cannot hold; before, it silently kept 0.094.
    model = Net()
    snapshot = _snapshot(model)
    calibration = [torch.randn(8, 16, dtype=torch.float64)] if allocation == "sensitivity" else None
    with pytest.raises(ValueError, match="ratio 0.01 is too small: rank 1 per layer already "
                                         "keeps 0.094"):
        lx.compress_model(model, ratio=0.01, allocation=allocation, calibration=calibration,
                          progress=False)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("allocation", ["uniform", "global", "sensitivity"])
def test_a_layer_that_stays_dense_counts_against_the_ratio(allocation):
    """A one-output head (no rank saves anything) stays dense: its 24 parameters count
    in the budget, so a ratio below what rank 1 elsewhere and the dense head keep is
    refused (it kept 72 of 600 weights for ratios of 0.09 to 0.11), and one above holds
    (over all layers where the budget is shared out; "uniform" keeps the ratio per layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(24, 1, dtype=torch.float64))
    calibration = ([torch.randn(64, 24, dtype=torch.float64)]
                   if allocation == "sensitivity" else None)
    snapshot = _snapshot(model)
    if allocation == "uniform":  # no shared budget: the layer that can keeps the ratio
        report = lx.compress_model(copy.deepcopy(model), ratio=0.1, allocation=allocation,
                                   progress=False)
        assert report.ranks == {"0": 1}
    else:
        with pytest.raises(ValueError, match=r"ratio 0.1 is too small: rank 1 \(dense where "
                                             r"that saves nothing\) per layer already keeps "
                                             r"0.120"):
            lx.compress_model(model, ratio=0.1, allocation=allocation, calibration=calibration,
                              progress=False)
        _assert_unchanged(model, snapshot)
    for ratio in (0.12, 0.2, 0.5):
        report = lx.compress_model(copy.deepcopy(model), ratio=ratio, allocation=allocation,
                                   calibration=calibration, progress=False)
        assert "2" not in report.ranks  # dense
        if allocation == "uniform":  # the ratio in every layer that can take it
            assert report.ranks["0"] == math.floor(ratio * 24 * 24 / 48 * (1 + 1e-12))
        else:  # one budget over all
            assert report.params_after <= ratio * report.params_before


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("multiple", [1, 2])
def test_a_ratio_budget_met_exactly_in_decimals_fits_in_every_check(allocation, multiple):
    """0.7·60·3/63 is 2 exactly, 1.9999999999999996 in floating point: every check takes
    the same slack, so rank 2 fits whatever the allocation (global gave 1, and
    rank_multiple=2 called it too small while saying it keeps 0.700)."""
    model = nn.Sequential(nn.Linear(3, 60))
    report = lx.compress_model(model, ratio=0.7, allocation=allocation, rank_multiple=multiple,
                               progress=False)
    assert report.ranks == {"0": 2}


def test_a_small_head_rounded_up_to_rank_one_is_fine_while_the_budget_holds():
    # head 2×64: ⌊0.5·128/66⌋ = 0, so it takes rank 1 (66 parameters for a
    # share of 64); the larger layer's rounding down (rank 13 of 13.7) keeps
    # the total within.
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 2))
    report = lx.compress_model(model, ratio=0.5, allocation="uniform", progress=False)
    assert report.ranks == {"0": 13, "2": 1}
    assert report.params_after <= 0.5 * report.params_before


class WithEmptyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.empty = nn.Linear(16, 0, dtype=torch.float64)
        self.fc = nn.Linear(16, 24, dtype=torch.float64)

    def forward(self, x):
        return self.fc(x), self.empty(x)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("kwargs", [
    dict(ratio=0.5), dict(rank=2), dict(energy=0.5),
    dict(ratio=0.5, calibration=[torch.randn(4, 16, dtype=torch.float64)]),
    dict(ratio=0.5, calibration=[torch.randn(4, 16, dtype=torch.float64)], sequential=True),
])
def test_an_empty_layer_stays_dense_and_the_report_prints(kwargs):
    model = WithEmptyLayer()
    report = lx.compress_model(model, progress=False, **kwargs)
    assert type(model.empty) is nn.Linear
    by_name = {layer.name: layer for layer in report.layers}
    assert not by_name["empty"].compressed and "empty weight (0×16)" in by_name["empty"].note
    assert by_name["fc"].compressed
    text = str(report)
    assert "empty" in text and "total" in text
    json.loads(report.to_json())


def _calibration_batches():
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(4, 16, dtype=torch.float64, generator=generator) for _ in range(6)]


@pytest.mark.parametrize("sequential", [False, True])
def test_a_generator_calibration_is_read_once_and_serves_every_run(sequential):
    batches = _calibration_batches()
    reference_model, model = Net().eval(), None
    model = copy.deepcopy(reference_model)
    expected = lx.compress_model(reference_model, ratio=0.5, calibration=batches,
                                 sequential=sequential, progress=False)
    report = lx.compress_model(model, ratio=0.5, calibration=(b for b in batches),
                               sequential=sequential, progress=False)
    assert report.ranks == expected.ranks
    for name, layer in report.ranks.items():
        torch.testing.assert_close(model.get_submodule(name).A,
                                   reference_model.get_submodule(name).A)


def test_a_shuffled_data_loader_gives_every_sensitivity_probe_the_same_batches():
    from torch.utils.data import DataLoader

    data = torch.cat(_calibration_batches())
    ordered = lx.compress_model(Net().eval(), ratio=0.5, progress=False,
                                calibration=DataLoader(data, batch_size=4))
    torch.manual_seed(0)
    shuffled = lx.compress_model(Net().eval(), ratio=0.5, progress=False,
                                 calibration=DataLoader(data, batch_size=4, shuffle=True))
    # The same batches in every run: the same sensitivities (up to the order
    # of the sums), where fresh shuffles moved them by up to 8× before.
    assert shuffled.ranks == ordered.ranks
    for a, b in zip(shuffled.layers, ordered.layers):
        assert a.sensitivity == pytest.approx(b.sensitivity, rel=1e-6)


def test_an_empty_calibration_iterable_is_named():
    model = Net()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="the calibration is an empty iterable"):
        lx.compress_model(model, ratio=0.5, calibration=iter([]), progress=False)
    _assert_unchanged(model, snapshot)


def test_float8_layers_are_refused_up_front():
    # float8 is floating point: it passed the dtype check and failed later in
    # torch's words ("isfinite" not implemented for 'Float8_e4m3fn').
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.float8_e4m3fn))
    bits = {k: v.view(torch.uint8).clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"layer\(s\) 1 have float8_e4m3fn weights"):
        lx.compress_model(model, rank=2, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert all(torch.equal(v.view(torch.uint8), bits[k]) for k, v in model.state_dict().items())


def test_compressing_under_inference_mode_leaves_a_trainable_model():
    model = Net(dtype=torch.float32)
    with torch.inference_mode():
        lx.compress_model(model, ratio=0.5, calibration=[torch.randn(8, 16)], progress=False)
    assert not any(p.is_inference() for p in model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    assert model.encoder["fc1"].A.grad is not None


class _FeaturesModel(nn.Module):
    """Called as model(features) with a dict, as a sentence-transformers model is."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 20, dtype=torch.float64)
        self.out = nn.Linear(20, 8, dtype=torch.float64)

    def forward(self, features):
        return self.out(torch.tanh(self.fc(features["x"])))


def test_padding_inside_a_tuple_batch_is_left_out_as_in_a_dict_batch():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    mask = torch.tensor([[1] * 3 + [0] * 4, [1] * 7])
    padded = [({"x": x, "attention_mask": mask},)]
    separate = [({"x": x[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]},)
                for i, n in enumerate((3, 7))]
    models = [_FeaturesModel() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model, batches in zip(models, (padded, separate)):
        lx.compress_model(model, rank=3, calibration=batches, progress=False)
    torch.testing.assert_close(models[0].fc.B @ models[0].fc.A, models[1].fc.B @ models[1].fc.A)


def test_padding_is_left_out_of_token_first_inputs_too():
    # torch's nn.Transformer layers (batch_first=False) see (tokens, batch, k).
    from lowrank_ext.calibration import collect_input_grams

    class TokenFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8, dtype=torch.float64)

        def forward(self, input_ids, attention_mask):
            return self.lin(input_ids.transpose(0, 1))

    model = TokenFirst()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    x[mask == 0] = 100.0  # padding carries garbage
    real = x[mask != 0]
    gram = collect_input_grams(model, {"lin": model.lin},
                               [dict(input_ids=x, attention_mask=mask)])["lin"]
    torch.testing.assert_close(gram, real.T @ real)


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (2, 5, 2, 3, 8), (5, 2, 3, 8)])
def test_padding_is_left_out_of_inputs_with_more_leading_dims(shape):
    # A layer applied per head sees (batch, tokens, heads, k): its padding rows
    # went into XᵀX (only three dims were read as per-token).
    from lowrank_ext.calibration import collect_input_grams

    class PerHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8, dtype=torch.float64)

        def forward(self, x, attention_mask):
            return self.lin(x)

    model = PerHead()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layout = mask if shape[0] == 2 else mask.T
    x = torch.randn(shape, dtype=torch.float64)
    x[layout == 0] = 100.0  # padding carries garbage
    real = x[layout != 0].reshape(-1, 8)
    gram = collect_input_grams(model, {"lin": model.lin},
                               [dict(x=x, attention_mask=mask)])["lin"]
    torch.testing.assert_close(gram, real.T @ real)
    # As many heads as tokens: (batch, heads, tokens, k) or (batch, tokens,
    # heads, k) cannot be told apart, and every row counts.
    if len(shape) == 4 and shape[0] == 2:
        square = torch.randn(2, 5, 5, 8, dtype=torch.float64)
        gram = collect_input_grams(model, {"lin": model.lin},
                                   [dict(x=square, attention_mask=mask)])["lin"]
        rows = square.reshape(-1, 8)
        torch.testing.assert_close(gram, rows.T @ rows)


def test_outputs_with_as_many_heads_as_tokens_are_compared_whole():
    # per_token_layout read (batch, heads, tokens, d) with heads == tokens as
    # (batch, tokens, ...): the sensitivity probes and distill left out heads.
    from lowrank_ext.calibration import per_token_layout
    from lowrank_ext.distill import relative_error

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert per_token_layout(torch.zeros(2, 5, 5, 3), mask) is None
    assert per_token_layout(torch.zeros(2, 5, 4, 3), mask) is mask
    assert per_token_layout(torch.zeros(5, 2, 5, 3), mask).shape == (5, 2)
    teacher = torch.randn(2, 5, 5, 3, dtype=torch.float64)
    student = teacher.clone()
    student[:, 3:] += 1.0  # heads 3 and 4, which the mask's padding columns would drop
    assert relative_error(student, teacher, mask) > 0.1


class SharedBias(nn.Module):
    """Two layers with their own weights and one bias between them."""

    def __init__(self):
        super().__init__()
        self.c = nn.Linear(32, 32, dtype=torch.float64)
        self.d = nn.Linear(32, 32, dtype=torch.float64)
        self.d.bias = self.c.bias
        self.e = nn.Linear(32, 32, dtype=torch.float64)

    def forward(self, x):
        return self.e(self.c(x) + self.d(x))


def test_layers_sharing_a_bias_stay_dense_and_keep_it_shared():
    model = SharedBias()
    report = lx.compress_model(model, rank=4)
    assert type(model.c) is nn.Linear and type(model.d) is nn.Linear
    assert model.d.bias is model.c.bias
    assert isinstance(model.e, lx.LowRankLinear)
    rows = {row.name: row for row in report.layers}
    assert rows["c"].rank is None and "bias shared with d.bias" in rows["c"].note
    assert rows["d"].rank is None and "bias shared with c.bias" in rows["d"].note


class SharedWeight(nn.Module):
    """Two layers holding one weight matrix (each with its own bias), and a plain one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32, dtype=torch.float64)
        self.b = nn.Linear(32, 32, dtype=torch.float64)
        self.b.weight = self.a.weight
        self.e = nn.Linear(32, 48, dtype=torch.float64)

    def forward(self, x):
        return self.e(self.a(x) + self.b(x))


def _unique_weight_parameters(model, names):
    """The parameters the named layers' weights (or factors) hold, each tensor once."""
    tensors = {}
    for name in names:
        layer = model.get_submodule(name)
        for p in ((layer.A, layer.B) if isinstance(layer, lx.LowRankLinear) else (layer.weight,)):
            tensors[id(p)] = p.numel()
    return sum(tensors.values())


@pytest.mark.parametrize("kwargs", [dict(rank=4), dict(ratio=0.5)])
def test_a_weight_several_layers_share_counts_once_in_the_totals(kwargs):
    model = SharedWeight()
    before = _unique_weight_parameters(model, ["a", "b", "e"])  # 32·32 + 48·32
    report = lx.compress_model(model, **kwargs)
    after = _unique_weight_parameters(model, ["a", "b", "e"])
    assert (report.params_before, report.params_after) == (before, after)
    assert report.ratio == pytest.approx(after / before)
    rows = {row.name: row for row in report.layers}
    assert rows["a"].params_before == rows["a"].params_after == 32 * 32
    assert rows["b"].params_before == rows["b"].params_after == 0
    assert "tied to a.weight" in rows["b"].note and "counted at a" in rows["b"].note
    assert "counted at" not in rows["a"].note
    data = json.loads(report.to_json())
    assert (data["totals"]["params_before"], data["totals"]["params_after"]) == (before, after)
    assert "b: dense: weight tied to a.weight" in str(report)
    # Only the second holder selected: it holds the weight alone in the report.
    report = lx.compress_model(SharedWeight(), include="b", **kwargs)
    assert report.params_before == 32 * 32 and "counted at" not in report.layers[0].note


def _low_rank_plus_noise(d, k, generator):
    return (torch.randn(d, 6, generator=generator, dtype=torch.float64)
            @ torch.randn(6, k, generator=generator, dtype=torch.float64)
            + 1e-3 * torch.randn(d, k, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("target", ["tol", "energy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_reported_errors_are_those_of_the_factors_as_stored(dtype, target, calibrated):
    """Rounding the factors to bfloat16 costs more than this truncation; the report shows
    it, and a layer whose tol or energy only the rounding misses says so."""
    g = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 64))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(_low_rank_plus_noise(*layer.weight.shape, g))
    model = model.to(dtype)
    original = copy.deepcopy(model)
    x = torch.randn(400, 96, generator=g, dtype=torch.float64).to(dtype)
    tol = 0.002
    kwargs = dict(tol=tol) if target == "tol" else dict(energy=1 - tol ** 2)
    report = lx.compress_model(model, calibration=[x] if calibrated else None, **kwargs)
    inputs = _layer_inputs(original, x) if calibrated else {}
    for row in report.layers:
        assert row.rank == 6  # the noise lies below tol
        W = original.get_submodule(row.name).weight.detach().double()
        layer = model.get_submodule(row.name)
        stored = layer.B.detach().double() @ layer.A.detach().double()
        weight_error = float((W - stored).norm() / W.norm())
        assert row.weight_error == pytest.approx(weight_error, rel=1e-6)
        error = weight_error
        if calibrated:
            X = inputs[row.name].double()
            error = float(((W - stored) @ X.T).norm() / (W @ X.T).norm())
            assert row.output_error == pytest.approx(error, rel=1e-6)
        if error > tol:
            # only bfloat16's 8 bits of precision take the stored factors past tol here
            assert dtype == torch.bfloat16
            assert "rounding the factors to bfloat16" in row.note
            assert ("above tol=0.002" if target == "tol" else "below energy=") in row.note
        else:
            assert row.note == ""
    if dtype == torch.bfloat16:
        assert all(row.note for row in report.layers)


@pytest.mark.parametrize("kwargs", [dict(ratio=0.5), dict(rank=2, sequential=True)])
@pytest.mark.parametrize("poison", ["nan", "meta"])
def test_a_refused_call_leaves_a_one_pass_calibration_unread(poison, kwargs):
    if poison == "meta":
        with torch.device("meta"):
            model = Net()
    else:
        model = Net()
        with torch.no_grad():
            model.head.weight[0, 0] = float("nan")
    batches = [torch.randn(8, 16, dtype=torch.float64) for _ in range(3)]
    calibration = iter(batches)
    with pytest.raises(ValueError, match="NaN or Inf in its weight|on the meta device"):
        lx.compress_model(model, calibration=calibration, **kwargs)
    assert list(calibration) == batches


class WithPackedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, dtype=torch.float64)
        self.fc = nn.Linear(16, 16, dtype=torch.float64)
        self.head = nn.Linear(16, 16, dtype=torch.float64)


@pytest.mark.parametrize("kwargs", [dict(exclude=map(str, ["head"])),
                                    dict(exclude=(p for p in ["head"])),
                                    dict(include=iter(["fc"]))])
def test_one_pass_include_and_exclude_iterators_are_read_once(kwargs):
    model = WithPackedAttention()
    with pytest.warns(UserWarning, match="MultiheadAttention") if "exclude" in kwargs \
            else contextlib.nullcontext():
        report = lx.compress_model(model, rank=2, **kwargs)
    assert report.ranks == {"fc": 2}
    assert isinstance(model.fc, lx.LowRankLinear) and type(model.head) is nn.Linear


def test_float16_factors_beyond_its_range_are_refused_not_stored_as_inf():
    """B holds orthonormal columns, so A = Bᵀ·W carries the column norms: 8·60000 here."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).half()
    with torch.no_grad():
        model[1].weight.fill_(60000.0)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="the rank-1 factors of layer '1' exceed the range "
                                         "of float16"):
        lx.compress_model(model, rank=1)
    _assert_unchanged(model, snapshot)


def _float64_layer_of_rank_4(scale):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, dtype=torch.float64)
    B, A = torch.randn(48, 4, dtype=torch.float64), torch.randn(4, 64, dtype=torch.float64)
    noise = 1e-3 * torch.randn(48, 64, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_((B @ A + noise) * scale)
        layer.bias.mul_(scale)
    return nn.Sequential(layer)


@pytest.mark.parametrize("scale", [2.0 ** -600, 2.0 ** -1000, 2.0 ** -1030, 2.0 ** 530])
@pytest.mark.parametrize("calibrated", [False, True])
def test_float64_weights_far_out_of_range_factor_as_their_scaled_copy(scale, calibrated):
    """W·G·Wᵀ squares the weight: entries of 1e-180 underflowed to zero
    factors (and a weight error of 0 in the report), 1e160 overflowed to NaN
    factors. The factors are the scaled copy's, scaled back, whatever the range."""
    torch.manual_seed(1)
    X = torch.randn(300, 64, dtype=torch.float64)
    calibration = [X] if calibrated else None
    normal, extreme = _float64_layer_of_rank_4(1.0), _float64_layer_of_rank_4(scale)
    W = extreme[0].weight.detach().clone()
    expected = lx.compress_model(normal, rank=4, calibration=calibration)
    report = lx.compress_model(extreme, rank=4, calibration=calibration)
    got, want = extreme[0], normal[0]
    torch.testing.assert_close((got.B @ got.A) / scale, want.B @ want.A, rtol=1e-9, atol=0)
    assert bool(torch.isfinite(got.A).all()) and bool(torch.isfinite(got.B).all())
    # The report measures the factors against the extreme weight itself.
    error = float(((got.B @ got.A - W) / scale).detach().norm() / (W / scale).norm())
    assert 1e-4 < report.layers[0].weight_error == pytest.approx(error, rel=1e-6)
    assert report.layers[0].weight_error == pytest.approx(expected.layers[0].weight_error, rel=1e-6)
    if calibrated:
        assert report.layers[0].output_error == pytest.approx(
            expected.layers[0].output_error, rel=1e-6)


@pytest.mark.parametrize("weight_scale, input_scale", [(1.0, 2.0 ** 500),
                                                       (2.0 ** -300, 2.0 ** -300)])
def test_calibration_inputs_far_out_of_range_choose_the_ranks_of_scaled_ones(weight_scale,
                                                                             input_scale):
    """Inputs of 1e150 have a Gram of 1e300, and W·G·Wᵀ overflowed; weights
    and inputs of 1e-90 gave a W·G·Wᵀ of 1e-360, which underflowed."""
    torch.manual_seed(1)
    X = [torch.randn(100, 64, dtype=torch.float64) for _ in range(2)]
    normal, extreme = _float64_layer_of_rank_4(1.0), _float64_layer_of_rank_4(weight_scale)
    expected = lx.compress_model(normal, ratio=0.3, calibration=X, allocation="global")
    report = lx.compress_model(extreme, ratio=0.3, calibration=[x * input_scale for x in X],
                               allocation="global")
    assert report.ranks == expected.ranks
    torch.testing.assert_close((extreme[0].B @ extreme[0].A) / weight_scale,
                               normal[0].B @ normal[0].A, rtol=1e-8, atol=1e-10)
    assert report.layers[0].output_error == pytest.approx(expected.layers[0].output_error,
                                                          rel=1e-6)


class _FreezingOnTrain(nn.Module):
    """A model whose train() also sets requires_grad, as some fine-tuning code does."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def train(self, mode=True):
        super().train(mode)
        for p in self.parameters():
            p.requires_grad_(mode)
        return self

    def forward(self, x):
        return self.fc2(self.fc1(x))


def test_calibration_never_runs_an_overridden_train():
    torch.manual_seed(0)
    model = _FreezingOnTrain().train()

    def raising(m):
        m(torch.randn(4, 16))
        raise RuntimeError("oops")

    with pytest.raises(RuntimeError, match="the calibration raised RuntimeError: oops"):
        lx.compress_model(model, rank=2, calibration=raising)
    assert model.training and all(p.requires_grad for p in model.parameters())
    lx.compress_model(model, rank=2, calibration=[torch.randn(4, 16)])
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert isinstance(model.fc1, lx.LowRankLinear)


def test_complex_layers_are_refused_before_any_work():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16, dtype=torch.complex64))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"compress_model: layer\(s\) 1 have complex64 weights"):
        lx.compress_model(model, rank=4)
    assert type(model[0]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lx.compress_model(model, rank=4, exclude="1")  # excluded, the rest goes on
    assert isinstance(model[0], lx.LowRankLinear)


@pytest.mark.parametrize("progress", ["no", 0, 1.0])
def test_progress_must_be_a_bool_or_none(progress):
    # progress="no" showed the bar (any truthy value did), where distill refuses it.
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=f"compress_model: progress must be True, False or None, "
                                        f"got {progress!r}"):
        lx.compress_model(model, rank=2, progress=progress)
    assert all(type(m) is nn.Linear for m in model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
