"""Export to ONNX (both of torch's exporters) and TorchScript tracing.

ONNX has no operator for the fused ops, so while an exporter traces a model
they are recorded as their pure-torch composition; the exported model runs in
onnxruntime with the outputs of the original. Plain ``torch.jit.trace`` keeps
the fused ops.
"""

import pytest
import torch

import lowrank_ext as lx

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


def _model(bias, merged):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        lx.LowRankLinear(24, 40, 5, bias=bias),
        torch.nn.GELU(),
        lx.LoRALinear(torch.nn.Linear(40, 16, bias=bias), 3, alpha=6),
        torch.nn.Tanh(),
        lx.LowRankLinear(16, 8, 2, bias=bias),
    )
    with torch.no_grad():
        model[2].B.normal_()  # a non-zero adapter
    if merged:
        model[2].merge()
    return model.eval()


def _reference(model, x):
    """The model in float64 with every layer's dense weight formed: W = B·A
    (and W + scale·B·A for the adapter), independent of both backends."""
    h = x.double()
    for layer in model:
        if isinstance(layer, lx.LowRankLinear):
            W = layer.B.double() @ layer.A.double()
            b = layer.bias
        elif isinstance(layer, lx.LoRALinear):
            W = layer.base.weight.double()
            if not layer.merged:
                W = W + layer.scale * (layer.B.double() @ layer.A.double())
            b = layer.base.bias
        else:
            h = layer(h)
            continue
        h = h @ W.T + (0 if b is None else b.double())
    return h


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _export(model, x, path, dynamo):
    if dynamo:
        torch.onnx.export(model, (x,), str(path), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based exporter
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_runs_in_onnxruntime(tmp_path, dynamo, bias, merged):
    import onnx

    model = _model(bias, merged)
    x = torch.randn(3, 24)
    path = tmp_path / "model.onnx"
    _export(model, x, path, dynamo)
    graph = onnx.load(str(path)).graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), \
        sorted({node.domain for node in graph.node})
    # The batch dimension stays free: another batch size runs too.
    for rows in (3, 7):
        x = torch.randn(rows, 24)
        got = _run_onnx(path, x)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.double(), _reference(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_leaves_eager_calls_alone(tmp_path):
    # The exporter's flag is set only while it traces: afterwards the fused
    # op runs again (its result, not a traced composition, is what eager sees).
    model = _model(True, False)
    x = torch.randn(3, 24)
    _export(model, x, tmp_path / "model.onnx", dynamo=False)
    assert not torch.onnx.is_in_onnx_export()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _reference(model, x), rtol=1e-4, atol=1e-5)


def test_jit_trace_keeps_the_fused_ops_and_reloads(tmp_path):
    model = _model(True, False)
    x = torch.randn(3, 24)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
    graph = str(traced.inlined_graph)
    assert "lowrank_ext::lowrank_linear" in graph and "lowrank_ext::lora_linear" in graph
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(loaded(x).double(), _reference(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_export_checks_inputs_without_tracer_warnings(tmp_path):
    """The input checks compare sizes the tracer records as tensors: they must still
    refuse bad inputs, without warning that the trace might be incorrect."""
    import warnings

    model = _model(True, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _export(model, torch.randn(3, 24), tmp_path / "model.onnx", dynamo=False)
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
            and "lowrank_ext" in w.filename]
    assert not ours, [str(w.message) for w in ours]

    class BadShapes(torch.nn.Module):
        def forward(self, x):
            return lx.lowrank_linear(x, torch.randn(4, 23), torch.randn(5, 4))

    with pytest.raises(ValueError, match="lowrank_linear: A has shape"):
        _export(BadShapes(), torch.randn(3, 24), tmp_path / "bad.onnx", dynamo=False)


def _fused_ops_in(ep):
    return sorted({str(node.target) for node in ep.graph.nodes
                   if str(node.target).startswith("lowrank_ext.")})


def test_exported_program_exports_after_the_decompositions(tmp_path):
    # torch.export keeps the fused ops, which ONNX has no operator for; the
    # decompositions turn them into their composition first.
    model = _model(True, False)
    x = torch.randn(3, 24)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert _fused_ops_in(ep)
    ep = ep.run_decompositions(lx.decompositions())
    assert not _fused_ops_in(ep)
    path = tmp_path / "model.onnx"
    torch.onnx.export(ep, (x,), str(path), dynamo=True)
    for rows in (3, 7):
        x = torch.randn(rows, 24)
        got = _run_onnx(path, x)
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.double(), _reference(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_the_default_decompositions_keep_the_public_ops(train):
    # torch's own decomposition table leaves custom ops alone; on the
    # fallback, re-tracing went through the autograd Function's forward and
    # put the internal *_with_intermediate ops in their place.
    model = _model(True, False).train(train)
    x = torch.randn(3, 24)
    ep = torch.export.export(model, (x,))
    assert _fused_ops_in(ep) == ["lowrank_ext.lora_linear.default",
                                 "lowrank_ext.lowrank_linear.default"]
    decomposed = ep.run_decompositions()
    assert _fused_ops_in(decomposed) == _fused_ops_in(ep)
    with torch.no_grad():
        torch.testing.assert_close(decomposed.module()(x), model(x), rtol=0, atol=0)


class _DirectOps(torch.nn.Module):
    """Calls every public op through torch.ops, as a hand-written graph would."""

    def __init__(self, dtype):
        super().__init__()
        make = lambda *shape: torch.nn.Parameter(torch.randn(*shape).to(dtype))  # noqa: E731
        self.A, self.B, self.W, self.bias = make(5, 24), make(16, 5), make(16, 24), make(16)

    def forward(self, x):
        ops = torch.ops.lowrank_ext
        y = ops.lowrank_linear(x, self.A, self.B, self.bias)
        y2, t = ops.lowrank_linear_with_intermediate(x, self.A, self.B, None)
        z = ops.lora_linear(x, self.W, self.A, self.B, self.bias, 0.5)
        z2, t2 = ops.lora_linear_with_intermediate(x, self.W, self.A, self.B, None, 2.0)
        return torch.cat([y, y2, z, z2, t, t2], dim=-1)

    def reference(self, x):
        """float64, from the dense weights."""
        x, A, B, W, b = (t.detach().double() for t in (x, self.A, self.B, self.W, self.bias))
        t = x @ A.T
        return torch.cat([t @ B.T + b, t @ B.T, x @ W.T + b + 0.5 * (t @ B.T),
                          x @ W.T + 2.0 * (t @ B.T), t, t], dim=-1)


def test_direct_op_calls_export_after_the_decompositions(tmp_path):
    model = _DirectOps(torch.float32)
    x = torch.randn(3, 24)
    ep = torch.export.export(model, (x,)).run_decompositions(lx.decompositions())
    assert not _fused_ops_in(ep)
    path = tmp_path / "direct.onnx"
    torch.onnx.export(ep, (x,), str(path), dynamo=True)
    got = _run_onnx(path, x)
    torch.testing.assert_close(got.double(), model.reference(x), rtol=1e-4, atol=1e-4)


def test_decompositions_compute_half_types_in_float32():
    # As the kernels: half arguments computed in float32 and rounded once, so
    # the result is the float64 one rounded, but for rare ties.
    model = _DirectOps(torch.bfloat16)
    x = torch.randn(3, 24).bfloat16()
    ep = torch.export.export(model, (x,)).run_decompositions(lx.decompositions())
    with torch.no_grad():
        got = ep.module()(x)
    assert got.dtype == torch.bfloat16
    rounded = model.reference(x).bfloat16()
    assert (got != rounded).float().mean() < 0.01
