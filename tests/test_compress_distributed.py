"""compress_model across the ranks of a gloo process group (2 processes) and with device=."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lowrank_ext as lx
from gloo_ranks import WORLD_SIZE, gloo_available, run_ranks
from lowrank_ext import compress as compress_module

pytestmark = pytest.mark.skipif(not gloo_available(), reason="needs torch.distributed with gloo")


def build_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 32, bias=False),
                          nn.Tanh(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 48))
    # Trained weights are not low-rank; random ones are not either. The test only
    # needs every rank and the single process to agree.
    return model.double()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(10, 24, dtype=torch.float64, generator=generator) for _ in range(4)]


def run_compress(model, calibration, **kwargs):
    return lx.compress_model(model, progress=False, calibration=calibration, **kwargs)


def _compress_on_rank(rank, directory, case):
    """One rank: compress; return the model state, or the error and whether the model changed."""
    result = {}
    model = build_model()
    counted = []

    class CountingSpectrum(compress_module.Spectrum):
        def __init__(self, weight, gram, device=None):
            counted.append(tuple(weight.shape))
            super().__init__(weight, gram, device)

    compress_module.Spectrum = CountingSpectrum
    if case["fail_on_rank"] == rank:
        def broken(*args, **kwargs):
            raise FloatingPointError("eigensolver did not converge")
        compress_module.Spectrum = broken
    kwargs = dict(case["kwargs"])
    if case["different_on_rank"] == rank:
        kwargs["exclude"] = "0"
    # Each rank calibrates on its own half of the batches.
    mine = batches()[rank::WORLD_SIZE] if not case["replicated"] else batches()
    mine = mine if case["calibrate"] else None
    if rank == 1 and case["local"] == "calibration raises":
        def mine(model):
            raise OSError("rank 1's data went missing")
    elif rank == 1 and case["local"] == "a NaN weight":
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    elif rank == 1 and case["local"] == "other weights":
        with torch.no_grad():
            model[0].bias.add_(0.5)
    elif rank == 1 and case["local"] == "another dtype":
        model.float()
    elif case["local"] == "the same NaN bias, other thread counts":
        # The sums' last bits differ with the thread count; NaN is NaN.
        torch.set_num_threads(rank + 1)
        with torch.no_grad():
            model[0].weight.sub_(model[0].weight.mean())  # Σw near 0: no digit of its own
            model[0].bias[0] = float("nan")
    elif rank == 1 and case["local"] == "its shard reaches one layer":
        def mine(model, shard=mine):
            for x in shard:
                model[0](x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        report = run_compress(model, mine, **kwargs)
        result["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        result["report"] = report.to_dict()
    except Exception as exc:  # the parent checks the type and message
        result["error"] = (type(exc).__name__, str(exc))
        result["unchanged"] = all(
            before[k].shape == v.shape and torch.allclose(before[k], v, rtol=0, atol=0,
                                                          equal_nan=True)
            for k, v in model.state_dict().items())
        result["linears"] = sum(type(m) is nn.Linear for m in model.modules())
    result["spectra_computed"] = len(counted)
    return result


def compress_on_ranks(tmp_path, **case):
    case = dict(dict(kwargs={}, calibrate=True, fail_on_rank=None, different_on_rank=None,
                     replicated=False, local=None), **case)
    return run_ranks(_compress_on_rank, tmp_path, case)


def single_process(calibrate=True, **kwargs):
    model = build_model()
    report = run_compress(model, batches() if calibrate else None, **kwargs)
    return model, report


def assert_same_model(state, model):
    reference = model.state_dict()
    assert set(state) == set(reference)
    for key, value in state.items():
        assert value.shape == reference[key].shape, key
    # The factors' signs may differ where float64 sums were taken in another
    # order; the products B·A, the layers' maps, may not.
    for prefix in {k.rsplit(".", 1)[0] for k in state if k.endswith(".A")}:
        mine = state[prefix + ".B"] @ state[prefix + ".A"]
        theirs = reference[prefix + ".B"] @ reference[prefix + ".A"]
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)
    for key, value in state.items():
        if not key.endswith((".A", ".B")):
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, replicated", [
    (dict(ratio=0.5, allocation="global"), False),
    (dict(ratio=0.6, allocation="uniform"), False),
    (dict(energy=0.9), False),
    (dict(ratio=0.5, allocation="global", sequential=True), False),
    # Sensitivities are measured by each layer's owner on its own calibration
    # data: equal to one process when every rank has all of it.
    (dict(ratio=0.5, allocation="sensitivity"), True),
], ids=["global", "uniform", "energy", "sequential", "sensitivity"])
def test_two_ranks_share_the_work_and_end_with_the_one_process_model(tmp_path, kwargs,
                                                                      replicated):
    results = compress_on_ranks(tmp_path, kwargs=kwargs, replicated=replicated)
    model, report = single_process(**kwargs)
    for result in results:
        assert "error" not in result, result["error"]
        assert_same_model(result["state"], model)
        for mine, theirs in zip(result["report"]["layers"], report.to_dict()["layers"],
                                strict=True):
            for key in ("name", "shape", "rank", "params_before", "params_after", "note"):
                assert mine[key] == theirs[key], key
            for key in ("weight_error", "output_error", "sensitivity"):
                assert (mine[key] is None) == (theirs[key] is None), key
                assert mine[key] is None or mine[key] == pytest.approx(theirs[key], rel=1e-7, abs=1e-12), key
    # Both ranks hold bitwise the same factors: they were exchanged, not recomputed.
    for key in results[0]["state"]:
        assert torch.equal(results[0]["state"][key], results[1]["state"][key]), key
    computed = [r["spectra_computed"] for r in results]
    assert all(c > 0 for c in computed), computed
    if not kwargs.get("sequential"):
        assert sum(computed) == len(report.layers), computed  # each layer decomposed once


def test_two_ranks_without_calibration(tmp_path):
    results = compress_on_ranks(tmp_path, kwargs=dict(rank=3), calibrate=False)
    model, _ = single_process(calibrate=False, rank=3)
    for result in results:
        assert_same_model(result["state"], model)


def test_a_failure_on_one_rank_is_raised_on_every_rank_and_changes_nothing(tmp_path):
    results = compress_on_ranks(tmp_path, kwargs=dict(ratio=0.5), fail_on_rank=1)
    assert results[1]["error"] == ("FloatingPointError", "eigensolver did not converge")
    kind, message = results[0]["error"]
    assert kind == "RuntimeError" and "failed on rank(s) [1]" in message
    for result in results:
        assert result["unchanged"] and result["linears"] == 4


@pytest.mark.parametrize("local, error, message, sequential", [
    ("calibration raises", "RuntimeError", "the calibration raised OSError", False),
    ("calibration raises", "RuntimeError", "the calibration raised OSError", True),
    ("a NaN weight", "ValueError", "layer '0' has NaN or Inf in its weight", False),
])
def test_a_local_failure_before_the_collectives_is_raised_on_every_rank(tmp_path, local, error,
                                                                       message, sequential):
    # Raised on rank 1 alone before any collective, the other rank would wait
    # for it until the group's timeout (30 minutes by default).
    results = compress_on_ranks(tmp_path, local=local,
                                kwargs=dict(ratio=0.5, allocation="global",
                                            sequential=sequential))
    assert results[1]["error"][0] == error and message in results[1]["error"][1]
    kind, text = results[0]["error"]
    assert kind == "RuntimeError" and "failed on rank(s) [1]" in text
    for result in results:
        assert result["unchanged"]


@pytest.mark.parametrize("allocation", ["global", "sensitivity"])
def test_a_layer_one_ranks_shard_never_reaches_is_calibrated_by_the_others(tmp_path,
                                                                           allocation):
    # Rank 1's shard only runs the first layer (an expert, a branch it never
    # takes); rank 0's reaches every layer, so the summed statistics cover all.
    # The layers rank 1 owns but never runs cannot have their sensitivity
    # measured there: they take the others' median, where 0 starved them.
    results = compress_on_ranks(tmp_path, local="its shard reaches one layer",
                                kwargs=dict(ratio=0.5, allocation=allocation))
    for result in results:
        assert "error" not in result, result["error"]
    for key in results[0]["state"]:
        assert torch.equal(results[0]["state"][key], results[1]["state"][key]), key
    if allocation == "sensitivity":
        layers = results[0]["report"]["layers"]
        assert all(layer["sensitivity"] > 0 for layer in layers), layers


def test_sequential_needs_every_shard_to_reach_every_layer(tmp_path):
    results = compress_on_ranks(tmp_path, local="its shard reaches one layer",
                                kwargs=dict(ratio=0.5, allocation="global", sequential=True))
    for result in results:
        kind, message = result["error"]
        assert kind == "RuntimeError" and "sequential=True needs every rank's share" in message
        assert result["unchanged"]


def test_ranks_given_different_layers_are_refused_instead_of_hanging(tmp_path):
    results = compress_on_ranks(tmp_path, kwargs=dict(ratio=0.5), different_on_rank=1)
    for result in results:
        kind, message = result["error"]
        assert kind == "RuntimeError" and "ranks [1] were called with other layers" in message
        assert result["unchanged"]


@pytest.mark.parametrize("local", ["other weights", "another dtype"])
def test_ranks_holding_other_weights_are_refused(tmp_path, local):
    # Each rank factorizes its share from its own copy: ranks that loaded
    # other weights (or cast the model) ended with other, mixed models.
    results = compress_on_ranks(tmp_path, kwargs=dict(rank=3), local=local, calibrate=False)
    for result in results:
        kind, message = result["error"]
        assert kind == "RuntimeError" and message == (
            "compress_model: ranks [1] differ from rank 0: their layers' weights, biases or "
            "dtypes differ from rank 0's; every rank must compress the same model (load the "
            "same weights first)")
        assert result["unchanged"]


def test_ranks_holding_the_same_weights_are_not_refused_for_rounding(tmp_path):
    # Compared exactly, a centred weight's sum (rounded otherwise with
    # another thread count) and a NaN in a bias refused identical ranks.
    results = compress_on_ranks(tmp_path, kwargs=dict(rank=3), calibrate=False,
                                local="the same NaN bias, other thread counts")
    assert "error" not in results[0] and "error" not in results[1]
    for key, value in results[0]["state"].items():
        torch.testing.assert_close(value, results[1]["state"][key], equal_nan=True)


def test_process_group_without_distributed_is_refused():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="process_group was given but torch.distributed"):
        lx.compress_model(build_model(), rank=2, process_group=object())


# --- device= ---------------------------------------------------------------------------
def test_device_cpu_gives_the_same_model():
    kwargs = dict(ratio=0.5)
    model, _ = single_process(**kwargs)
    other = build_model()
    run_compress(other, batches(), device="cpu", **kwargs)
    assert_same_model(other.state_dict(), model)


def test_the_factorization_runs_on_the_given_device_one_layer_at_a_time(monkeypatch):
    """With device=, eigh sees tensors on that device and the results come home.

    Without a GPU the only device is the CPU, so this checks the plumbing (every
    eigh input on the requested device, the model left where it was);
    test_device_cuda_for_a_model_on_the_cpu checks a real second device.
    """
    seen = []
    real_eigh = torch.linalg.eigh

    def spy(matrix, *args, **kwargs):
        seen.append(matrix.device)
        return real_eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    model = build_model()
    run_compress(model, batches(), ratio=0.5, device=torch.device("cpu"))
    assert seen and all(d == torch.device("cpu") for d in seen)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_for_a_model_on_the_cpu():
    kwargs = dict(ratio=0.5)
    model, _ = single_process(**kwargs)
    other = build_model()
    run_compress(other, batches(), device="cuda", **kwargs)
    assert all(p.device.type == "cpu" for p in other.parameters())
    assert_same_model(other.state_dict(), model)


@pytest.mark.parametrize("device, error, message", [
    ("tpu-ish", ValueError, "device 'tpu-ish' is not a device"),
    (1.5, TypeError, "device must be a torch.device, str or int, got float"),
    ("meta", ValueError, "device 'meta' holds no data"),
])
def test_bad_device(device, error, message):
    model = build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        lx.compress_model(model, rank=2, device=device)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_device_without_a_gpu():
    with pytest.raises(ValueError, match=r"device 'cuda' is not available"):
        lx.compress_model(build_model(), rank=2, device="cuda")


class _SharedInputs(nn.Module):
    """q, v and k fed one tensor, except k on the batches marked to part."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.q, self.v, self.k = (nn.Linear(16, 16, dtype=torch.float64) for _ in range(3))

    def forward(self, x, part=False):
        h = torch.tanh(x)
        return self.q(h) + self.v(h) + self.k(h * 2 if part else h)


def _shared_input_batches():
    generator = torch.Generator().manual_seed(3)
    # (batch, part): k's inputs part from q's and v's on rank 1's share only.
    return [(torch.randn(12, 16, dtype=torch.float64, generator=generator), part)
            for part in (False, False, False, True)]


def _calibrate(batches):
    def calibration(model):
        with torch.inference_mode():  # its sums are inference tensors, summed over ranks after
            for x, part in batches:
                model(x, part)
    return calibration


def _compress_shared_inputs_on_rank(rank, directory):
    model = _SharedInputs()
    lx.compress_model(model, rank=4, progress=False,
                      calibration=_calibrate(_shared_input_batches()[rank::WORLD_SIZE]))
    return {name: (layer.B @ layer.A).detach() for name, layer in model.named_children()}


def test_layers_sharing_inputs_on_one_rank_but_not_the_other_are_summed_apart(tmp_path):
    """On rank 0 q, v and k share one XᵀX; on rank 1 k's inputs part from theirs: k's
    sum over the ranks is its own, q's and v's one, as one process over all the data."""
    model = _SharedInputs()
    lx.compress_model(model, rank=4, progress=False, calibration=_calibrate(_shared_input_batches()))
    for result in run_ranks(_compress_shared_inputs_on_rank, tmp_path):
        for name, layer in model.named_children():
            torch.testing.assert_close(result[name], (layer.B @ layer.A).detach(),
                                       rtol=1e-9, atol=1e-9)


def _bar_on_rank(rank, directory):
    import tqdm.auto

    from recording_bar import RecordingBar

    tqdm.auto.tqdm = RecordingBar  # a process of its own: nothing to put back
    bars = RecordingBar.made
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 16))
    calibration = [torch.randn(30, 16)] if rank == 0 else []  # rank 1's share is empty
    with warnings.catch_warnings():  # rank 1 measures no sensitivity and says so
        warnings.simplefilter("ignore")
        lx.compress_model(model, ratio=0.5, calibration=calibration, progress=True)
    return bars[-1].n, bars[-1].total, bars[-1].closed


def test_the_progress_bar_is_full_on_a_rank_whose_share_is_empty(tmp_path):
    """The rank with no data runs none of its sensitivity probes: their steps still count."""
    for n, total, closed in run_ranks(_bar_on_rank, tmp_path):
        assert closed and n == total


def _no_layer_on_one_rank(rank, directory):
    """Rank 1's two layers tie one weight, so it has no layer to factorize."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    if rank == 1:
        model[2].weight = model[0].weight
    try:
        lx.compress_model(model, rank=4, progress=False)
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(not gloo_available(), reason="needs torch.distributed with gloo")
def test_a_rank_without_layers_is_refused_on_every_rank_instead_of_hanging(tmp_path):
    # Rank 1 returned at once, rank 0 waited for it until the group's timeout.
    for message in run_ranks(_no_layer_on_one_rank, tmp_path):
        assert message is not None and "were called with other layers" in message


def _outside_the_group(rank, directory):
    group = torch.distributed.new_group([0])  # every rank takes part in making it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    try:
        report = lx.compress_model(model, rank=4, progress=False, process_group=group)
    except ValueError as exc:
        return str(exc)
    return report.ranks


@pytest.mark.skipif(not gloo_available(), reason="needs torch.distributed with gloo")
def test_a_process_outside_the_group_is_told_so(tmp_path):
    inside, outside = run_ranks(_outside_the_group, tmp_path)
    assert inside == {"0": 4, "2": 4}
    assert outside == ("compress_model: this process is not a member of process_group; call "
                       "compress_model on the group's members only")


def _compress_on_rank_zero_alone(rank, directory):
    group = dist.new_group([0])  # every rank takes part in making it
    if rank != 0:
        return None
    model = build_model()
    lx.compress_model(model, rank=3, progress=False, process_group=group)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_one_rank_compresses_alone_with_a_group_of_its_own(tmp_path):
    # README: a call on one rank alone, with the default group, would wait
    # for the others until the group's timeout.
    state, nothing = run_ranks(_compress_on_rank_zero_alone, tmp_path)
    assert nothing is None
    model = build_model()
    lx.compress_model(model, rank=3, progress=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
