"""Training under DDP and FSDP2 (gloo, 2 processes) equals one process on the full batch.

Two processes each train a LoRALinear -> GELU -> LowRankLinear model on half of
every batch; their parameters after a few optimizer steps must equal those of
one process that trains the same initial model on the whole batches. DDP and
FSDP average the gradients, so with a loss that is a mean over the local half
the two agree up to the order of the summations. The LoRA base layer must stay
frozen and bit-identical.

Robustness (timeouts, tracebacks, no process left behind): see gloo_ranks.py.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lowrank_ext as lx
from gloo_ranks import WORLD_SIZE, gloo_available, run_ranks

STEPS = 4
BATCH = 16  # per step, split evenly across the ranks
IN, HIDDEN, OUT = 6, 10, 4

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)
# name -> (wrapper, its options, dtype, bias, optimizer, tolerance against one process)
CONFIGS = {
    "ddp-f64-bias-sgd": ("ddp", {}, torch.float64, True, "sgd", F64),
    "ddp-f64-nobias-adam-static": ("ddp", {"static_graph": True}, torch.float64, False, "adam",
                                   F64),
    "ddp-f32-bias-adam": ("ddp", {}, torch.float32, True, "adam", F32),
    "fsdp2-f64-bias-adam": ("fsdp2", {}, torch.float64, True, "adam", F64),
    "fsdp2-f32-nobias-sgd": ("fsdp2", {}, torch.float32, False, "sgd", F32),
}

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch without FSDP2
    fully_shard = None

pytestmark = pytest.mark.skipif(not gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def build(dtype, bias):
    """LoRALinear(nn.Linear) -> GELU -> LowRankLinear, with a non-zero LoRA B."""
    lora = lx.LoRALinear(nn.Linear(IN, HIDDEN, bias=bias, dtype=dtype), 3, alpha=6)
    with torch.no_grad():
        lora.B.normal_(0.0, 0.5)  # so that A gets a gradient from the first step
    return nn.Sequential(lora, nn.GELU(), lx.LowRankLinear(HIDDEN, OUT, 2, bias=bias, dtype=dtype))


def make_optimizer(kind, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.05)


def wrap(kind, model, options):
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model, **options)
    # FSDP2, one unit per layer holding parameters, then the root. (Not
    # lora.base alone: LoRALinear reads base.weight without calling base.)
    fully_shard(model[0], **options)
    fully_shard(model[2], **options)
    return fully_shard(model, **options)


def full_state(model):
    """The state_dict as plain tensors (FSDP2 holds sharded DTensors; this gathers them)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def train(model, optimizer, xs, ys):
    for x, y in zip(xs, ys):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)  # a mean: DDP and FSDP average across ranks
        loss.backward()
        optimizer.step()


def _train_on_rank(rank, directory):
    """One rank: train every config on its half of each batch."""
    inputs = torch.load(os.path.join(directory, "inputs.pt"))
    results = {"compiled": lx.backend_info()["compiled"]}
    half = BATCH // WORLD_SIZE
    rows = slice(rank * half, (rank + 1) * half)
    for name, (kind, options, dtype, bias, opt, _) in CONFIGS.items():
        if kind == "fsdp2" and fully_shard is None:
            continue
        model = build(dtype, bias)
        model.load_state_dict(inputs[name]["init"])
        wrapped = wrap(kind, model, options)
        optimizer = make_optimizer(opt, wrapped)
        train(wrapped, optimizer, inputs[name]["x"][:, rows], inputs[name]["y"][:, rows])
        results[name] = {
            "state": full_state(model),
            "base_grads": [p.grad for p in model[0].base.parameters()],
            "base_requires_grad": [p.requires_grad for p in model[0].base.parameters()],
        }
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Inputs, and the results of every config from both ranks: one spawn for all tests."""
    directory = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    inputs = {}
    for name, (_, _, dtype, bias, *_rest) in CONFIGS.items():
        inputs[name] = {
            "init": {k: v.clone() for k, v in build(dtype, bias).state_dict().items()},
            "x": torch.randn(STEPS, BATCH, IN, dtype=dtype),
            "y": torch.randn(STEPS, BATCH, OUT, dtype=dtype),
        }
    torch.save(inputs, directory / "inputs.pt")
    return inputs, run_ranks(_train_on_rank, directory)


def test_workers_ran_on_this_processes_backend(trained):
    _, results = trained
    assert [r["compiled"] for r in results] == [lx.backend_info()["compiled"]] * WORLD_SIZE


def _needs(name):
    if CONFIGS[name][0] == "fsdp2" and fully_shard is None:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_one_process_on_the_full_batch(trained, name):
    _needs(name)
    inputs, results = trained
    _, _, dtype, bias, opt, tolerance = CONFIGS[name]
    model = build(dtype, bias)
    model.load_state_dict(inputs[name]["init"])
    train(model, make_optimizer(opt, model), inputs[name]["x"], inputs[name]["y"])
    expected = model.state_dict()
    rank0, rank1 = (r[name]["state"] for r in results)
    assert set(rank0) == set(expected)
    for key, value in expected.items():
        # The ranks apply the same averaged gradient: bit-identical replicas
        # (FSDP: each rank's shard, gathered).
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], value, **tolerance, msg=lambda m: f"{key}: {m}")
    # Training moved every trainable parameter (the comparison is not vacuous).
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.A", "0.B", "2.A", "2.B"} | ({"2.bias"} if bias else set())
    for key in trainable:
        assert not torch.equal(rank0[key], inputs[name]["init"][key]), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lora_base_stays_frozen_and_identical(trained, name):
    _needs(name)
    inputs, results = trained
    base_keys = [k for k in inputs[name]["init"] if k.startswith("0.base.")]
    assert base_keys == (["0.base.weight", "0.base.bias"] if CONFIGS[name][3]
                         else ["0.base.weight"])
    for result in results:
        assert result[name]["base_grads"] == [None] * len(base_keys)
        assert result[name]["base_requires_grad"] == [False] * len(base_keys)
        for key in base_keys:
            assert torch.equal(result[name]["state"][key], inputs[name]["init"][key]), key
