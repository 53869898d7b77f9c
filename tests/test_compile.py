"""torch.compile support: opcheck (schema, fake kernels, autograd registration,
AOT dispatch) and compiled results equal to eager."""

import pytest
import torch

import lowrank_ext as lx

ops = torch.ops.lowrank_ext


def _lowrank_samples():
    f64 = dict(dtype=torch.float64)
    yield (torch.randn(3, 5, **f64), torch.randn(2, 5, **f64), torch.randn(4, 2, **f64),
           torch.randn(4, **f64))
    yield (torch.randn(2, 3, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True),
           torch.randn(4, 2, requires_grad=True), None)
    yield (torch.randn(5, dtype=torch.bfloat16), torch.randn(2, 5, dtype=torch.bfloat16),
           torch.randn(4, 2, dtype=torch.bfloat16), torch.randn(4, dtype=torch.bfloat16))
    yield (torch.randn(0, 5), torch.randn(2, 5), torch.randn(4, 2), torch.randn(4))


@pytest.mark.parametrize("i", range(4))
def test_opcheck_lowrank_linear(i):
    args = list(_lowrank_samples())[i]
    torch.library.opcheck(ops.lowrank_linear.default, args)


@pytest.mark.parametrize("i", range(4))
def test_opcheck_lowrank_linear_with_intermediate(i):
    args = [a.detach() if a is not None else None for a in list(_lowrank_samples())[i]]
    torch.library.opcheck(ops.lowrank_linear_with_intermediate.default, args)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_lora_linear(requires_grad):
    args = [torch.randn(3, 6), torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2),
            torch.randn(4)]
    args = [a.requires_grad_(requires_grad) for a in args]
    torch.library.opcheck(ops.lora_linear.default, (*args, 0.5))
    torch.library.opcheck(ops.lora_linear_with_intermediate.default,
                          (*[a.detach() for a in args], 0.5))


@pytest.mark.parametrize("balanced", [False, True])
def test_opcheck_svd_truncate(balanced):
    torch.library.opcheck(ops.svd_truncate.default, (torch.randn(6, 4, dtype=torch.float64), 2,
                                                     balanced))


def _model_step(x, A, B, b):
    return torch.relu(lx.lowrank_linear(x, A, B, b)) * 2.0


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(_model_step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for M in (4, 7):
        x, A, B, b = torch.randn(M, 12), torch.randn(3, 12), torch.randn(8, 3), torch.randn(8)
        torch.testing.assert_close(compiled(x, A, B, b), _model_step(x, A, B, b))


def test_compile_inductor_forward_and_backward():
    torch._dynamo.reset()

    def loss_fn(x, W, A, B, b):
        return (lx.lora_linear(x, W, A, B, b, scale=2.0).square().mean()
                + lx.lowrank_linear(x, A, W[:, :2]).sum())

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaves = [torch.randn(5, 6), torch.randn(6, 6), torch.randn(2, 6), torch.randn(6, 2),
              torch.randn(6)]
    eager_args = [t.clone().requires_grad_() for t in leaves]
    comp_args = [t.clone().requires_grad_() for t in leaves]
    loss_e, loss_c = loss_fn(*eager_args), compiled(*comp_args)
    torch.testing.assert_close(loss_c, loss_e)
    loss_e.backward()
    loss_c.backward()
    for e, c in zip(eager_args, comp_args):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_weight_grad(dtype):
    # Internal, but defined on every backend: graphs torch.compile cached with
    # the compiled extension may call it after a switch to the fallback.
    a, b = torch.randn(300, 7, dtype=dtype), torch.randn(300, 9, dtype=dtype)
    torch.library.opcheck(ops._weight_grad.default, (a, b))
    torch.testing.assert_close(ops._weight_grad(a, b), a.T @ b)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opcheck_rows_times_weight(w_dtype):
    # Internal like _weight_grad: lora_linear's CPU backward gx at a few rows.
    g, W = torch.randn(3, 37), torch.randn(37, 21).to(w_dtype)
    torch.library.opcheck(ops._rows_times_weight.default, (g, W))
    torch.testing.assert_close(ops._rows_times_weight(g, W), g @ W.float())
    # d = 0: an empty sum, all zeros (the output is not pre-zeroed).
    assert torch.equal(ops._rows_times_weight(g[:, :0], W[:0]), torch.zeros(3, 21))
    with pytest.raises(RuntimeError, match="_rows_times_weight: expected float32 g"):
        ops._rows_times_weight(g.double(), W)
    with pytest.raises(RuntimeError, match="expected g \\(M, d\\) and W \\(d, n\\)"):
        ops._rows_times_weight(g, W.t())


def test_compile_backward_with_many_rows_matches_float64():
    # From 256 float32 rows the CPU backward computes the weight gradients with
    # the _weight_grad kernel, which the compiled graph reaches through its
    # fake kernel.
    torch._dynamo.reset()

    def loss_fn(x, A, B, b):
        return lx.lowrank_linear(x, A, B, b).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaves = [torch.randn(300, 70), torch.randn(20, 70) / 8, torch.randn(45, 20) / 4,
              torch.randn(45)]
    comp_args = [t.clone().requires_grad_() for t in leaves]
    ref_args = [t.double().requires_grad_() for t in leaves]
    got = torch.autograd.grad(compiled(*comp_args), comp_args)
    x, A, B, b = ref_args
    want = torch.autograd.grad((x @ (B @ A).T + b).square().sum(), ref_args)
    for g, w in zip(got, want):
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * scale)


def test_export_keeps_the_ops_as_nodes_and_round_trips(tmp_path):
    from torch import nn

    model = nn.Sequential(lx.LowRankLinear(16, 32, 4, dtype=torch.float64), nn.ReLU(),
                          lx.LoRALinear(nn.Linear(32, 8, dtype=torch.float64), 2)).eval()
    with torch.no_grad():
        model[2].B.normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    program = torch.export.export(model, (x,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"lowrank_ext.lowrank_linear.default", "lowrank_ext.lora_linear.default"} <= targets
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    other = torch.randn(9, 16, dtype=torch.float64)
    for inp in (x, other):
        expected = model[2].base(torch.relu(inp @ (model[0].B @ model[0].A).T + model[0].bias))
        expected = expected + model[2].scale * (torch.relu(
            inp @ (model[0].B @ model[0].A).T + model[0].bias) @ (model[2].B @ model[2].A).T)
        torch.testing.assert_close(loaded(inp), expected.detach())


def test_aot_inductor_package_runs_the_ops(tmp_path):
    # An exported program compiled ahead of time (AOTInductor) calls the ops
    # through the dispatcher: the package runs wherever lowrank_ext is imported.
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(lx.LowRankLinear(64, 128, 8), nn.ReLU(),
                          lx.LoRALinear(nn.Linear(128, 32), 4)).eval()
    with torch.no_grad():
        model[2].B.normal_()
    x = torch.randn(5, 64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = torch._inductor.aoti_compile_and_package(program,
                                                    package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for rows in (5, 7):
        inp = torch.randn(rows, 64)
        h = torch.relu(inp.double() @ (model[0].B @ model[0].A).double().T
                       + model[0].bias.double())
        lora = model[2]
        want = h @ (lora.base.weight.double()
                    + lora.scale * (lora.B @ lora.A).double()).T + lora.base.bias.double()
        torch.testing.assert_close(loaded(inp).double(), want.detach(), rtol=1e-4, atol=1e-5)


# --- dynamic batch sizes in training ------------------------------------------
def _layer_with_float64_reference(kind):
    """A layer and its output recomputed in float64 from (float64 copies of) its
    parameters, by the composition the fused op stands for."""
    from torch import nn

    if kind == "LowRankLinear":
        layer = lx.LowRankLinear(16, 8, 4)

        def reference(x, p):
            return x @ (p["B"] @ p["A"]).T + p["bias"]
    else:
        layer = lx.LoRALinear(nn.Linear(16, 8), 4, alpha=2.0)
        with torch.no_grad():
            layer.B.normal_()  # zero at init: A's gradient would be zero too

        def reference(x, p):
            return x @ (p["base.weight"] + layer.scale * p["B"] @ p["A"]).T + p["base.bias"]
    return layer, reference


def _assert_grads_match_float64(layer, reference, out_fn, x):
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = dict(layer.named_parameters())
    got = torch.autograd.grad(out_fn(x), [x, *(params[n] for n in names)])
    p64 = {n: p.detach().double().requires_grad_(p.requires_grad) for n, p in params.items()}
    x64 = x.detach().double().requires_grad_()
    want = torch.autograd.grad(reference(x64, p64).square().sum(),
                               [x64, *(p64[n] for n in names)])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


@pytest.mark.parametrize("kind", ["LowRankLinear", "LoRALinear"])
@pytest.mark.parametrize("dynamic, max_graphs", [(True, 2), (None, 3)])
def test_compile_training_over_batch_sizes_needs_few_graphs(kind, dynamic, max_graphs):
    # The backward runs the sizes torch.compile traces symbolically: read as
    # integers they specialised every batch size (a graph each, and past the
    # recompile limit fullgraph=True failed). Only the backward's row
    # thresholds may split the sizes now (dynamic=None: the first size is
    # compiled static).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer, reference = _layer_with_float64_reference(kind)
    step = torch.compile(lambda x: layer(x).square().sum(), fullgraph=True, dynamic=dynamic,
                         backend="aot_eager")
    for rows in range(2, 14):
        _assert_grads_match_float64(layer, reference, step,
                                    torch.randn(rows, 16, requires_grad=True))
    assert counters["stats"]["unique_graphs"] <= max_graphs


@pytest.mark.parametrize("op", ["lowrank_linear", "lora_linear"])
def test_compile_mark_dynamic_batch_in_training(op):
    # Every argument requires a gradient (lora_linear's W too). The backward
    # guards on rows >= 4, so the size marked dynamic stays above it.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    leaves = {"W": torch.randn(8, 16), "A": torch.randn(4, 16), "B": torch.randn(8, 4),
              "bias": torch.randn(8)}
    if op == "lowrank_linear":
        del leaves["W"]

        def fused(x, p):
            return lx.lowrank_linear(x, p["A"], p["B"], p["bias"])

        def reference(x, p):
            return x @ (p["B"] @ p["A"]).T + p["bias"]
    else:
        def fused(x, p):
            return lx.lora_linear(x, p["W"], p["A"], p["B"], p["bias"], 0.5)

        def reference(x, p):
            return x @ (p["W"] + 0.5 * p["B"] @ p["A"]).T + p["bias"]

    params = {n: t.requires_grad_() for n, t in leaves.items()}
    step = torch.compile(lambda x: fused(x, params).square().sum(), fullgraph=True,
                         backend="aot_eager")
    for rows in (6, 9):
        x = torch.randn(rows, 16, requires_grad=True)
        if rows == 6:
            torch._dynamo.mark_dynamic(x, 0)
        got = torch.autograd.grad(step(x), [x, *params.values()])
        p64 = {n: t.detach().double().requires_grad_() for n, t in params.items()}
        x64 = x.detach().double().requires_grad_()
        want = torch.autograd.grad(reference(x64, p64).square().sum(), [x64, *p64.values()])
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-4,
                                       atol=1e-4 * float(w.abs().max()))
    assert counters["stats"]["unique_graphs"] == 1


# Inductor's cache of compiled graphs does not key on the extension's C++
# backward: graphs cached by another build would bring that build's guards.
@torch._inductor.config.patch(force_disable_caches=True)
def test_compile_inductor_training_over_batch_sizes():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer, reference = _layer_with_float64_reference("LowRankLinear")
    step = torch.compile(lambda x: layer(x).square().sum(), fullgraph=True, dynamic=True)
    for rows in (5, 6, 9):
        _assert_grads_match_float64(layer, reference, step,
                                    torch.randn(rows, 16, requires_grad=True))
    assert counters["stats"]["unique_graphs"] == 1
