"""Forward-mode AD (torch.autograd.forward_ad) at the compiled entry points: the
C++ autograd kernels have no forward-mode formula, so a tangent must never
reach them unnoticed (it was dropped, the output carrying none)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from conftest import requires_compiled
from lowrank_ext import _backend

ops = torch.ops.lowrank_ext

# The tensor arguments of each op, in order (lora_linear's scale follows).
ARGUMENTS = {
    "lowrank_linear": ("x", "A", "B", "bias"),
    "lora_linear": ("x", "W", "A", "B", "bias"),
}
CASES = [(op, name) for op, names in ARGUMENTS.items() for name in names]


def _arguments(op, requires_grad=False):
    shapes = {"x": (3, 6), "W": (5, 6), "A": (2, 6), "B": (5, 2), "bias": (5,)}
    tensors = [torch.randn(*shapes[name], dtype=torch.float64).requires_grad_(requires_grad)
               for name in ARGUMENTS[op]]
    return tensors if op == "lowrank_linear" else [*tensors, 0.5]


def _with_dual(args, op, name):
    """args with the one named made a dual tensor (inside a dual level)."""
    i = ARGUMENTS[op].index(name)
    return [*args[:i], fwAD.make_dual(args[i], torch.randn_like(args[i])), *args[i + 1:]]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("op, name", CASES)
def test_torch_ops_call_with_a_tangent_raises(op, name, requires_grad):
    # torch.ops reaches the autograd kernel directly; the Python function
    # lowrank_ext.<op> is the route that carries tangents. (The fallback's
    # Python autograd kernel has no jvp either: it says so as the C++ one does.)
    args = _arguments(op, requires_grad)
    message = rf"{op}: forward-mode AD .* call lowrank_ext\.{op} \(the Python function\)"
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=message):
            getattr(ops, op)(*_with_dual(args, op, name))


@pytest.mark.parametrize("op", ARGUMENTS)
def test_torch_ops_call_with_forward_grad_mode_off_runs(op):
    # With forward grad mode off ATen's ops ignore tangents: so does the op.
    args = _arguments(op)
    want = getattr(ops, op)(*args)
    with fwAD.dual_level(), fwAD._set_fwd_grad_enabled(False):
        got = getattr(ops, op)(*_with_dual(args, op, "x"))
    torch.testing.assert_close(got, want)


@requires_compiled
@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("op, name", CASES)
def test_fast_entry_point_leaves_a_tangent_to_python(op, name, requires_grad):
    fast = getattr(_backend._C, op)
    args = _arguments(op, requires_grad)
    with fwAD.dual_level():
        assert fast(*_with_dual(args, op, name)) is NotImplemented
        # Inside a dual level, arguments without a tangent still take the fast path.
        assert isinstance(fast(*args), torch.Tensor)


@requires_compiled
def test_fast_entry_point_sees_a_tangent_given_to_a_views_base():
    # A view taken before its base got a tangent (in place) has none of its
    # own, but ATen's ops read the base's.
    x, A, B, bias = _arguments("lowrank_linear")
    with fwAD.dual_level():
        base = x.clone()
        view = base[:2]
        base.copy_(fwAD.make_dual(x, torch.randn_like(x)))
        assert fwAD.unpack_dual(view).tangent is not None
        assert _backend._C.lowrank_linear(view, A, B, bias) is NotImplemented


@requires_compiled
def test_fast_entry_point_after_the_dual_level_ends():
    # Leaving the level removes the tangent: the same tensor takes the fast path.
    x, A, B, bias = _arguments("lowrank_linear")
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
    got = _backend._C.lowrank_linear(dual, A, B, bias)
    torch.testing.assert_close(got, x @ (B @ A).T + bias)
