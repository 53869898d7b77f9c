"""The fused ops under a differentiating ``torch.func`` transform (``grad``,
``vjp``, ``jacrev``, ``jvp``, ...) while torch.compile traces the caller.

Traced as ops, they reach their autograd kernels, which functorch cannot see
through: the eager backend failed there, and the others fell back to eager
for the whole frame. Marked ``nonstrict_trace``, the route the eager calls
take (``_functorch``'s autograd.Functions, which dynamo cannot trace: they
have a ``jvp``) is recorded as one call that the graph runs under the
transform, on every backend, so ``fullgraph=True`` holds. ``vmap`` alone
keeps the ops themselves in the graph: their batching rules trace.

A module of its own, imported only while torch.compile traces a call under
a transform: the decorators import ``torch._dynamo``, which
``import lowrank_ext`` should not pay for.
"""

from __future__ import annotations

import torch

from . import _functorch

# torch.compiler's name from torch 2.12 or so; torch._dynamo's before (2.11).
_nonstrict_trace = getattr(torch.compiler, "nonstrict_trace", None)
if _nonstrict_trace is None:
    import torch._dynamo

    _nonstrict_trace = torch._dynamo.nonstrict_trace


# Run while tracing, its result a constant of the graph: dynamo guards a
# graph built under a transform on the whole interpreter stack, so the graph
# is not reused under another stack.
@torch.compiler.assume_constant_result
def differentiating_transform_active() -> bool:
    """Whether a torch.func transform other than vmap is active."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(level.key() != torch._C._functorch.TransformType.Vmap for level in stack)


def lowrank_linear(x, A, B, bias):
    """:func:`lowrank_ext.lowrank_linear` as in eager, one call of the graph."""
    # nonstrict_trace takes tensors, not None: a layer without bias has its own.
    if bias is None:
        return _lowrank_linear_without_bias(x, A, B)
    return _lowrank_linear(x, A, B, bias)


def lora_linear(x, W, A, B, bias, scale):
    """:func:`lowrank_ext.lora_linear` as in eager, one call of the graph."""
    if bias is None:
        return _lora_linear_without_bias(x, W, A, B, scale)
    return _lora_linear(x, W, A, B, bias, scale)


@_nonstrict_trace
def _lowrank_linear(x, A, B, bias):
    return _functorch.lowrank_linear(x, A, B, bias)


@_nonstrict_trace
def _lowrank_linear_without_bias(x, A, B):
    return _functorch.lowrank_linear(x, A, B, None)


@_nonstrict_trace
def _lora_linear(x, W, A, B, bias, scale):
    return _functorch.lora_linear(x, W, A, B, bias, scale)


@_nonstrict_trace
def _lora_linear_without_bias(x, W, A, B, scale):
    return _functorch.lora_linear(x, W, A, B, None, scale)
