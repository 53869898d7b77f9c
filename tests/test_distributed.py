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


def _refusals_on_rank(rank, directory):
    """Every layer-swapping function given a DDP-wrapped model, and distill given
    one made with other trainable parameters: {name: (error type, message)}."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4)).double()

    refused = {}

    def attempt(name, call):
        try:
            call()
        except Exception as exc:  # the parent checks the type and message
            refused[name] = (type(exc).__name__, str(exc))

    path = os.path.join(directory, "compressed.safetensors")
    compressed = model()
    lx.compress_model(compressed, rank=2, progress=False)
    lx.save_compressed(compressed, path)
    wrapped = DDP(model())
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    attempt("compress_model", lambda: lx.compress_model(wrapped, rank=2, progress=False))
    attempt("add_lora", lambda: lx.add_lora(wrapped, 2))
    attempt("load_compressed", lambda: lx.load_compressed(wrapped, path))
    attempt("split_attention",
            lambda: lx.split_attention(DDP(nn.Sequential(nn.MultiheadAttention(8, 2)))))
    inside = nn.ModuleDict({"inner": DDP(model())})
    attempt("inside", lambda: lx.add_lora(inside, 2))
    unchanged = all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items()) and \
        all(type(m) is nn.Linear for m in wrapped.module if isinstance(m, nn.Linear))
    # distill: the wrapper must synchronize exactly what distill trains.
    data = [torch.randn(5, 6, dtype=torch.float64) for _ in range(2)]
    attempt("distill", lambda: lx.distill(DDP(compressed), model(), data, steps=1,
                                          progress=False))
    for p in compressed.parameters():
        p.requires_grad = p.dim() == 2  # the factors, as distill trains them
    result = lx.distill(DDP(compressed), model(), data, steps=2, progress=False)
    return {"refused": refused, "unchanged": unchanged, "trained": result.steps}


def test_layer_swapping_functions_refuse_a_ddp_wrapper(tmp_path):
    # DDP synchronizes the parameters it was made with: layers swapped in
    # afterwards trained on each rank's data alone, and the replicas drifted
    # apart without a word (distill's froze and unfroze parameters it had).
    (result,) = run_ranks(_refusals_on_rank, tmp_path, world_size=1)
    refused = result["refused"]
    for name in ("compress_model", "add_lora", "load_compressed", "split_attention"):
        kind, message = refused[name]
        assert kind == "TypeError" and message.startswith(
            f"{name}: the model is a DistributedDataParallel wrapper, which would go on "
            "synchronizing the parameters it was made with"), (name, message)
        assert f"call {name} on every rank on the model it wraps (its .module) before " \
               "wrapping it, then wrap it anew" in message
    assert refused["inside"][1].startswith("add_lora: 'inner' is a DistributedDataParallel")
    assert result["unchanged"]
    kind, message = refused["distill"]
    assert kind == "ValueError" and message.startswith(
        "distill: the model is a DistributedDataParallel wrapper made with other trainable "
        "parameters than distill trains (it would freeze 0.bias, 2.bias)")
    assert result["trained"] == 2


def _sharded_refusals_on_rank(rank, directory):
    torch.manual_seed(0)
    model = nn.Sequential(lx.LowRankLinear(6, 8, 3), nn.GELU(),
                          nn.Linear(8, 4)).double()
    lx.add_lora(model, 2)
    with torch.no_grad():
        model[0].B.normal_()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    compressed = nn.Sequential(lx.LowRankLinear(6, 8, 3)).double()  # no adapters
    fully_shard(compressed)
    adapted = nn.Sequential(nn.Linear(6, 8)).double()  # peft takes dense bases only
    lx.add_lora(adapted, 2)
    fully_shard(adapted)
    x = torch.randn(5, 6, dtype=torch.float64)
    before = model(x).detach().clone()
    refused = {}
    for name, call in (
            ("merge", lambda: model[0].merge()),
            ("merge_lora", lambda: lx.merge_lora(model)),
            ("save_compressed", lambda: lx.save_compressed(
                compressed, os.path.join(directory, f"c{rank}.safetensors"))),
            ("save_peft_adapter", lambda: lx.save_peft_adapter(
                adapted, os.path.join(directory, f"adapter{rank}")))):
        try:
            call()
        except Exception as exc:  # the parent checks the type and message
            refused[name] = (type(exc).__name__, str(exc))
    # A dense base too: a merge into the gathered weight was undone at the
    # next gathering. So with one unit for the whole model (the layers' own
    # parameters gathered after a forward: merge_lora sees the unit).
    whole = nn.Sequential(nn.Linear(6, 8)).double()
    lx.add_lora(whole, 2)
    fully_shard(whole)
    with torch.no_grad():
        whole(x)
    for name, call in (("dense merge", lambda: model[2].merge()),
                       ("root only", lambda: lx.merge_lora(whole))):
        try:
            call()
        except Exception as exc:  # the parent checks the type and message
            refused[name] = (type(exc).__name__, str(exc))
    after = model(x).detach().clone()
    return {"refused": refused, "same": torch.allclose(before, after, rtol=1e-12, atol=1e-12),
            "files": sorted(os.listdir(directory)),
            "unmerged": not model[0].merged and not model[2].merged}


def test_sharded_factors_are_not_merged_nor_saved_in_shards(tmp_path):
    # Merged, a sharded LowRankLinear base got new factors that FSDP replaced
    # with its own at the next forward: the adapter was lost without a word.
    # The savers failed on the shards with torch's "invalid python storage".
    if fully_shard is None:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    for result in run_ranks(_sharded_refusals_on_rank, tmp_path):
        refused = result["refused"]
        for name, error in (("merge", "RuntimeError"), ("merge_lora", "ValueError"),
                            ("dense merge", "RuntimeError"), ("root only", "ValueError")):
            kind, message = refused[name]
            assert kind == error and "it is managed by FSDP2 (fully_shard), which gathers its " \
                "parameters from their shards at every use" in message, (name, message)
        for name in ("save_compressed", "save_peft_adapter"):
            kind, message = refused[name]
            assert kind == "ValueError" and "is a sharded DTensor (FSDP2's fully_shard): each " \
                "rank holds a shard only" in message, (name, message)
        assert result["same"] and result["unmerged"]
        assert not [f for f in result["files"] if f.startswith(("c0", "c1", "adapter"))]
