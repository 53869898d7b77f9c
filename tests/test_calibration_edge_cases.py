"""compress_model on calibrations at the edges: fewer directions than the rank, inputs
updated in place under inference_mode, outputs or inputs that measure nothing, batches
of the wrong width and empty shards on one rank; references computed here in float64."""

import collections
import math
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx
from gloo_ranks import gloo_available, run_ranks
from lowrank_ext.calibration import collect_input_grams


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, state):
    assert all(type(m) is not lx.LowRankLinear for m in model.modules())
    assert set(model.state_dict()) == set(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


# --- a calibration spanning fewer directions than the rank (the fill) --------------------
def _projection_reference(W, X, rank):
    """The projection of W onto the leading left singular vectors of W·Xᵀ that the
    data determines, completed by those of the rest of W, by torch.linalg.svd."""
    U, S, _ = torch.linalg.svd(W @ X.T)
    live = int((S > S[0] * 1e-9).sum())
    U = U[:, :min(live, rank)]
    rest = W - U @ (U.T @ W)
    more = torch.linalg.svd(rest)[0][:, :rank - U.shape[1]]
    Q = torch.cat([U, more], 1)
    return Q @ (Q.T @ W)


@pytest.mark.parametrize("rank", [2, 9])
@pytest.mark.parametrize("d, k", [(60, 24), (24, 60)], ids=["tall", "wide"])
def test_few_calibration_directions_give_a_projection_of_w_for_tall_and_wide(d, k, rank):
    span = 3
    model = nn.Sequential(nn.Linear(k, d, dtype=torch.float64))
    W = model[0].weight.detach().clone()
    X = torch.randn(40, span, dtype=torch.float64) @ torch.randn(span, k, dtype=torch.float64)
    report = lx.compress_model(model, rank=rank, calibration=[X], progress=False)
    (row,) = report.layers
    B, A = model[0].B.detach(), model[0].A.detach()
    torch.testing.assert_close(B.T @ B, torch.eye(rank, dtype=B.dtype), rtol=0, atol=1e-10)
    assert torch.linalg.matrix_norm(B @ A, 2) <= torch.linalg.matrix_norm(W, 2) * (1 + 1e-10)
    expected = _projection_reference(W, X, rank)
    torch.testing.assert_close(B @ A, expected, rtol=1e-8, atol=1e-8)
    assert row.weight_error <= 1.0
    assert row.weight_error == pytest.approx(
        float(torch.linalg.matrix_norm(W - expected) / torch.linalg.matrix_norm(W)), rel=1e-8)
    # On the calibration the output error is the optimal tail: 0 once the rank
    # covers the data's directions.
    S = torch.linalg.svdvals(W @ X.T)
    optimal = float(S[rank:].square().sum().sqrt() / S.square().sum().sqrt())
    assert row.output_error == pytest.approx(optimal, abs=1e-7)


def test_a_float32_tall_layer_on_one_calibration_direction_is_no_larger_than_w():
    # The reviewer's case: B·A was 22 times larger than W.
    model = nn.Sequential(nn.Linear(50, 200))
    W = model[0].weight.detach().double()
    X = torch.randn(64, 1) @ torch.randn(1, 50)
    report = lx.compress_model(model, rank=20, calibration=[X], progress=False)
    B, A = model[0].B.detach().double(), model[0].A.detach().double()
    torch.testing.assert_close(B.T @ B, torch.eye(20, dtype=B.dtype), rtol=0, atol=1e-5)
    assert torch.linalg.matrix_norm(B @ A, 2) <= torch.linalg.matrix_norm(W, 2) * (1 + 1e-5)
    assert report.layers[0].weight_error <= 1.0


@pytest.mark.parametrize("d, k", [(40, 16), (16, 40)], ids=["tall", "wide"])
def test_a_weight_of_lower_rank_than_kept_still_gets_orthonormal_columns(d, k):
    W = torch.randn(d, 2, dtype=torch.float64) @ torch.randn(2, k, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(k, d, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.copy_(W)
    lx.compress_model(model, rank=6, progress=False)
    B, A = model[0].B.detach(), model[0].A.detach()
    torch.testing.assert_close(B.T @ B, torch.eye(6, dtype=B.dtype), rtol=0, atol=1e-10)
    torch.testing.assert_close(B @ A, W, rtol=1e-10, atol=1e-10)


# --- inputs updated in place under inference_mode ----------------------------------------
class _Residual(nn.Module):
    """h += layer(h): every layer reads the same tensor, updated in place after it."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16, dtype=torch.float64) for _ in range(3))
        self.q = nn.Linear(16, 16, dtype=torch.float64)
        self.k = nn.Linear(16, 16, dtype=torch.float64)

    def forward(self, x):
        h = x.clone()
        for layer in self.layers:
            h += layer(h)
        return self.q(h) * self.k(h)  # two layers fed the same, unchanged tensor


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inputs_updated_in_place_give_each_layer_its_own_gram(mode):
    model = _Residual()
    x = torch.randn(32, 16, dtype=torch.float64)
    layers = dict(model.named_modules())
    layers = {name: layers[name] for name in ("layers.0", "layers.1", "layers.2", "q", "k")}
    truth = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, n=name: truth.__setitem__(n, args[0].T @ args[0]))
        for name, layer in layers.items()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()

    def calibration(m):
        with mode():
            m(x)

    stages = []
    grams = collect_input_grams(model, layers, calibration, stages)
    for name in layers:
        torch.testing.assert_close(grams[name], truth[name], rtol=1e-12, atol=1e-12)
    # q and k, fed the same unchanged tensor, still share one product (one stage).
    assert stages == [["layers.0"], ["layers.1"], ["layers.2"], ["q", "k"]]


# --- outputs or inputs that measure nothing --------------------------------------------
def test_outputs_that_overflow_are_named_and_the_model_kept():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).half()
    with torch.no_grad():
        model[2].weight.mul_(1e5)  # finite weights, outputs past float16's 65504
    x = torch.randn(64, 16).half()
    with torch.no_grad():
        assert not torch.isfinite(model(x)).all()
    state = _state(model)
    with pytest.raises(ValueError, match="found NaN or Inf in the model's outputs on the "
                                         "calibration"):
        lx.compress_model(model, ratio=0.5, calibration=[x], progress=False)
    _assert_unchanged(model, state)


class _ZeroInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.live = nn.Linear(16, 16)
        self.tall = nn.Linear(16, 64)
        self.wide = nn.Linear(64, 16)

    def forward(self, x):
        return self.live(x), self.tall(x * 0), self.wide(x.new_zeros(x.shape[0], 64))


@pytest.mark.parametrize("kwargs", [dict(tol=0.05), dict(ratio=0.5, allocation="global"),
                                    dict(rank=2, sequential=True)])
def test_a_layer_whose_inputs_are_all_zero_is_named_and_the_model_kept(kwargs):
    model = _ZeroInputs()
    state = _state(model)
    with pytest.raises(ValueError, match=r"gave layer\(s\) tall, wide only zero inputs"):
        lx.compress_model(model, calibration=[torch.randn(8, 16)], progress=False, **kwargs)
    _assert_unchanged(model, state)
    # Leaving them out compresses the rest.
    report = lx.compress_model(model, calibration=[torch.randn(8, 16)], progress=False,
                               exclude=["tall", "wide"], **kwargs)
    assert [row.name for row in report.layers] == ["live"]


def test_global_allocation_gives_no_ranks_where_they_remove_no_error():
    # The second layer's output is 0 on every input: its ranks remove nothing.
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64),
                          nn.Linear(16, 16, bias=False, dtype=torch.float64))
    with torch.no_grad():
        model[1].weight.zero_()
    report = lx.compress_model(model, ratio=0.9, allocation="global",
                               calibration=[torch.randn(64, 16, dtype=torch.float64)],
                               progress=False)
    assert report.ranks["1"] == 1
    torch.testing.assert_close(model[1].B @ model[1].A, torch.zeros(16, 16, dtype=torch.float64))


# --- a batch of the wrong width ----------------------------------------------------------
def test_a_batch_of_the_wrong_width_raises_the_layers_own_error():
    model = nn.Sequential(nn.Linear(16, 32))
    x = torch.randn(3, 15)
    with pytest.raises(RuntimeError) as plain:
        model(x)
    state = _state(model)
    with pytest.raises(RuntimeError, match="the calibration raised RuntimeError") as raised:
        lx.compress_model(model, ratio=0.5, calibration=[x], progress=False)
    assert str(plain.value) in str(raised.value)
    _assert_unchanged(model, state)


# --- an empty shard on one rank -----------------------------------------------------------
def _empty_shard_on_rank(rank, directory):
    """Rank 1's shard is empty; then both ranks' inputs are all zero."""
    results = {}
    data = torch.randn(20, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for allocation in ("global", "sensitivity"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)).double()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = lx.compress_model(model, ratio=0.5, allocation=allocation, progress=False,
                                       calibration=[data] if rank == 0 else [])
        results[allocation] = (_state(model), report.to_dict(),
                               [str(w.message) for w in caught])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32)).double()
    try:
        lx.compress_model(model, ratio=0.5, allocation="global", progress=False,
                          calibration=[torch.zeros(4, 16, dtype=torch.float64)])
    except ValueError as exc:
        results["zero"] = str(exc)
    return results, data


@pytest.mark.skipif(not gloo_available(), reason="needs torch.distributed with gloo")
def test_an_empty_shard_on_one_rank_is_calibrated_by_the_others(tmp_path):
    (mine, data), (theirs, _) = run_ranks(_empty_shard_on_rank, tmp_path)
    for allocation in ("global", "sensitivity"):
        state, report, caught = mine[allocation]
        # Both ranks end with the same model: with global allocation the one a
        # single process compresses on rank 0's data; with sensitivities, the
        # layer rank 1 owns (layer 2) takes the median of the measured ones.
        for key, value in theirs[allocation][0].items():
            assert torch.equal(value, state[key]), key
        if allocation == "global":
            torch.manual_seed(0)
            single = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)).double()
            expected = lx.compress_model(single, ratio=0.5, allocation="global",
                                         progress=False, calibration=[data]).to_dict()
            for row, want in zip(report["layers"], expected["layers"], strict=True):
                assert row["rank"] == want["rank"]
                for key in ("weight_error", "output_error"):
                    assert row[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
        else:
            for results in (mine, theirs):
                assert any("never runs them" in m for m in results[allocation][2])
            assert all(math.isfinite(row["sensitivity"]) for row in report["layers"])
    for results in (mine, theirs):
        assert "gave layer(s) 0 only zero inputs" in results["zero"]


def test_an_empty_calibration_without_a_process_group_is_still_an_error():
    model = nn.Sequential(nn.Linear(16, 32))
    state = _state(model)
    with pytest.raises(ValueError, match="the calibration is an empty iterable"):
        lx.compress_model(model, ratio=0.5, allocation="global", calibration=[],
                          progress=False)
    _assert_unchanged(model, state)



class _Parting(nn.Module):
    """q, v, k and w fed one tensor in turn, except k on even calls; w twice each call."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.w = (nn.Linear(8, 8, dtype=torch.float64) for _ in range(4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(x)
        k_in = h if self.calls % 2 else h * 2
        return self.q(h) + self.v(h) + self.k(k_in) + self.w(h) + self.w(h)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_layers_sharing_inputs_share_one_sum_until_their_inputs_part(mode):
    """q and v (fed the same tensors throughout) hold one XᵀX; k, fed them on some
    calls only, and w, fed them twice, sums of their own; each is its inputs' sum."""
    model = _Parting()
    names = ("q", "k", "v", "w")
    batches = [torch.randn(5, 8, dtype=torch.float64) for _ in range(3)]
    truth = {name: torch.zeros(8, 8, dtype=torch.float64) for name in names}
    hooks = [getattr(model, name).register_forward_pre_hook(
        lambda module, args, n=name: truth[n].add_(args[0].T @ args[0])) for name in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for hook in hooks:
        hook.remove()

    def calibration(m):
        with mode():
            for x in batches:
                m(x)

    model.calls = 0
    grams = collect_input_grams(model, {n: getattr(model, n) for n in names}, calibration)
    for name in names:
        torch.testing.assert_close(grams[name], truth[name], rtol=1e-12, atol=1e-12)
    assert grams["q"] is grams["v"]
    assert grams["k"] is not grams["q"] and grams["w"] is not grams["q"]


# --- hooks: compiled models, TorchScript parts, stages ---------------------------------------
class _InPlaceBetweenLayers(nn.Module):
    """q and k read h, then h changes in place before o reads it."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = (nn.Linear(8, 8, dtype=torch.float64) for _ in range(3))

    def forward(self, x):
        h = torch.tanh(x)
        a = self.q(h) * self.k(h)
        h += a
        return self.o(h)


def _grams_by_hand(model, names, batches):
    grams = {n: torch.zeros(8, 8, dtype=torch.float64) for n in names}
    def add(name):
        def hook(module, args):
            grams[name].add_(args[0].T @ args[0])  # returns None: the input stays
        return hook

    handles = [getattr(model, n).register_forward_pre_hook(add(n)) for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for handle in handles:
        handle.remove()
    return grams


def test_a_compiled_model_gives_each_layer_its_own_inputs():
    """Traced by torch.compile, the hooks missed the in-place update between
    k and o and gave o the XᵀX of q and k."""
    torch.manual_seed(0)
    model = _InPlaceBetweenLayers()
    batches = [torch.randn(5, 8, dtype=torch.float64) for _ in range(3)]
    expected = _grams_by_hand(model, "qko", batches)
    compiled = torch.compile(model, backend="aot_eager")
    grams = collect_input_grams(compiled, {n: getattr(model, n) for n in "qko"}, batches)
    for name in "qko":
        torch.testing.assert_close(grams[name], expected[name], rtol=1e-12, atol=1e-12)
    assert grams["q"] is grams["k"] and grams["o"] is not grams["q"]


class _Vision(nn.Module):
    """A second tower, with a patch convolution of its own."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv1d(1, 16, kernel_size=4, stride=4)
        self.proj = nn.Linear(16, 16)

    def forward(self, pixels):
        return self.proj(self.patch(pixels[:, None]).transpose(1, 2))


class _TwoTowersWithScript(nn.Module):
    """Token and patch towers (PaddingMasks hooks every module), and a TorchScript
    module, on which torch refuses hooks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.vision = _Vision()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
            self.act = torch.jit.script(nn.Tanh())

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, pixels, attention_mask=None):
        return self.act(self.fc(self.embed(input_ids))).mean(1) + self.vision(pixels).mean(1)


def test_a_model_with_a_torchscript_part_calibrates_and_keeps_no_hooks():
    # Registering a hook on the scripted part raised half-way, and the hooks
    # registered before it stayed on the model.
    torch.manual_seed(0)
    model = _TwoTowersWithScript()
    batch = {"input_ids": torch.randint(0, 50, (2, 5)), "pixels": torch.randn(2, 32),
             "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    report = lx.compress_model(model, rank=2, calibration=[batch], progress=False)
    assert report.ranks == {"fc": 2, "vision.proj": 2}
    for module in model.modules():
        if not isinstance(module, torch.jit.ScriptModule):
            assert not module._forward_pre_hooks and not module._forward_hooks


def test_padding_masks_leave_no_hooks_when_registering_fails(monkeypatch):
    from lowrank_ext import calibration

    torch.manual_seed(0)
    model = _TwoTowersWithScript()
    calls = []
    real = nn.Module.register_forward_hook

    def failing_third(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "register_forward_hook", failing_third)
    with pytest.raises(KeyboardInterrupt):
        with calibration.PaddingMasks(model):
            pass
    monkeypatch.undo()
    for module in model.modules():
        if not isinstance(module, torch.jit.ScriptModule):
            assert not module._forward_hooks


class _SharedLayerCalledAgain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = (nn.Linear(16, 16, dtype=torch.float64) for _ in range(3))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.c(h))
        return self.a(h) + self.b(h)  # a again, then b on the same h, made by c


def test_stages_do_not_join_a_layer_to_the_stage_its_input_was_made_in():
    torch.manual_seed(0)
    model = _SharedLayerCalledAgain()
    stages = []
    collect_input_grams(model, {"a": model.a, "c": model.c, "b": model.b},
                        [torch.randn(64, 16, dtype=torch.float64)], stages)
    assert stages == [["a"], ["c"], ["b"]]


def test_sequential_whitens_a_layer_after_the_one_its_input_comes_from():
    """b must see the inputs of the compressed c (sequential=True's promise)."""
    torch.manual_seed(0)
    model = _SharedLayerCalledAgain()
    X = torch.randn(64, 16, dtype=torch.float64)
    W = model.b.weight.detach().clone()
    lx.compress_model(model, rank=4, calibration=[X], sequential=True, progress=False)
    with torch.no_grad():
        H = torch.tanh(model.c(torch.tanh(model.a(X))))
    # The best rank-4 map for these inputs, by an SVD of W·L (L·Lᵀ = HᵀH).
    L = torch.linalg.cholesky(H.T @ H)
    U = torch.linalg.svd(W @ L)[0][:, :4]
    torch.testing.assert_close(model.b.B @ model.b.A, U @ (U.T @ W), rtol=1e-8, atol=1e-10)


class _LayerCalledTwiceInARow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = (nn.Linear(16, 16, dtype=torch.float64) for _ in range(2))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.a(h) + self.b(h)  # a again on h, made by a; then b on h


def test_stages_of_a_layer_called_twice_in_a_row():
    torch.manual_seed(0)
    model = _LayerCalledTwiceInARow()
    stages = []
    collect_input_grams(model, {"a": model.a, "b": model.b},
                        [torch.randn(64, 16, dtype=torch.float64)], stages)
    assert stages == [["a"], ["b"]]


def test_stages_keep_layers_fed_one_tensor_together():
    """q, k and v fed one tensor share a stage, also after a layer called twice."""
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.q, self.k, self.v = (nn.Linear(8, 8, dtype=torch.float64)
                                                for _ in range(4))

        def forward(self, x):
            h = self.pre(self.pre(x))
            return self.q(h) + self.k(h) + self.v(h)

    model = Attention()
    stages = []
    collect_input_grams(model, dict(model.named_children()),
                        [torch.randn(10, 8, dtype=torch.float64)], stages)
    assert stages == [["pre"], ["q", "k", "v"]]


class _ScriptedMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
            self.act = torch.jit.script(nn.Tanh())
        self.fc2 = nn.Linear(16, 16, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_sensitivity_allocation_passes_over_a_torchscript_part():
    torch.manual_seed(0)
    model = _ScriptedMiddle()
    report = lx.compress_model(model, ratio=0.5, calibration=[torch.randn(32, 16,
                                                                          dtype=torch.float64)],
                               progress=False)
    assert all(row.sensitivity is not None for row in report.layers)
    for module in model.modules():
        if not isinstance(module, torch.jit.ScriptModule):
            assert not module._forward_pre_hooks and not module._forward_hooks


def test_inputs_whose_gram_is_subnormal_are_named_as_too_small():
    """Inputs of 1e-161 give an XᵀX of about 1e-322, subnormal: no digits to whiten with."""
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64))
    state = _state(model)
    X = torch.randn(8, 16, dtype=torch.float64) * 1e-161
    with pytest.raises(ValueError, match=r"only zero inputs \(or only padding tokens, or values "
                                         r"so small that XᵀX underflows float64\)"):
        lx.compress_model(model, rank=2, calibration=[X], progress=False)
    _assert_unchanged(model, state)


class _Noisy(nn.Module):
    """Draws a random number in every forward (noise injection, sampling)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.draws = []

    def forward(self, x):
        noise = torch.rand(())
        self.draws.append(float(noise))
        h = torch.relu(self.a(x)) + noise
        return self.c(torch.relu(self.b(h)))


def test_every_calibration_run_draws_the_same_random_numbers():
    # Each run drew fresh numbers, so a sensitivity probe measured the noise
    # as much as the truncation; and compress_model advanced the caller's
    # generator.
    import copy

    torch.manual_seed(0)
    model = _Noisy()
    twin = copy.deepcopy(model)
    x = torch.randn(64, 16)
    state = torch.get_rng_state()
    report = lx.compress_model(model, ratio=0.5, calibration=[x], progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(model.draws) > 3 and len(set(model.draws)) == 1  # the Gram run and every probe
    # From the same state, the same numbers: the same ranks and sensitivities.
    again = lx.compress_model(twin, ratio=0.5, calibration=[x], progress=False)
    assert twin.draws == model.draws
    assert [(r.name, r.rank, r.sensitivity) for r in report.layers] == \
        [(r.name, r.rank, r.sensitivity) for r in again.layers]


class _NormalizesInPlace(nn.Module):
    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        x = x.sub_(1.0) if self.in_place else x - 1.0
        return self.b(torch.relu(self.a(x)))


class _Inputs(list):
    pass


_Single = collections.namedtuple("_Single", "x")


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: (x,), _Single, lambda x: _Inputs([x])],
                         ids=["tensor", "tuple", "namedtuple", "list-subclass"])
def test_a_model_that_changes_its_inputs_in_place_sees_the_same_batches_every_run(wrap):
    # Every run saw the inputs the run before had changed (x − 1, x − 2, ...),
    # so the probes measured the drift; and the caller's tensors changed (in
    # batches of a tuple or list subclass, a namedtuple say, still after the
    # first fix).
    torch.manual_seed(0)
    inputs = [torch.randn(64, 16) + 3 for _ in range(2)]
    originals = [x.clone() for x in inputs]
    batches = [wrap(x) for x in inputs]
    reports = []
    for in_place in (False, True):
        torch.manual_seed(1)
        model = _NormalizesInPlace(in_place)
        reports.append(lx.compress_model(model, ratio=0.5, calibration=batches, progress=False))
    assert all(torch.equal(x, x0) for x, x0 in zip(inputs, originals))
    assert [(r.rank, r.sensitivity) for r in reports[0].layers] == \
        [(r.rank, r.sensitivity) for r in reports[1].layers]


def test_a_dataclass_output_is_measured_by_the_sensitivity_probes():
    import dataclasses

    @dataclasses.dataclass
    class Output:
        hidden: torch.Tensor
        label: str = "x"

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return Output(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    report = lx.compress_model(Model(), ratio=0.5, calibration=[torch.randn(64, 16)],
                               progress=False)
    assert all(r.sensitivity is not None and r.sensitivity > 0 for r in report.layers)
