"""Decompositions of the fused ops, for graphs that hold them (``torch.export``).

``torch.onnx.export`` of a model records the ops as their pure-torch
composition while it traces (``ops``), but an ``ExportedProgram`` made by
``torch.export.export``, or any graph that calls ``torch.ops.lowrank_ext.*``
directly, keeps the ops themselves, for which ONNX has no operator. Decomposing
them first makes such a graph exportable::

    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions(lowrank_ext.decompositions())
    torch.onnx.export(ep, (x,), "model.onnx", dynamo=True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._fallback import lora_forward, lowrank_forward
from ._library import ops


def _lowrank_linear(x, A, B, bias):
    return lowrank_forward(x, A, B, bias)[0]


def _lora_linear(x, W, A, B, bias, scale):
    return lora_forward(x, W, A, B, bias, scale)[0]


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """A decomposition table for the fused ops, for ``ExportedProgram.run_decompositions``.

    Each op becomes the pure-torch composition of its kernels (half types
    computed in float32 and rounded once, as the kernels do), which any
    exporter can express. Only the fused ops are in the table: pass it alone
    to leave the rest of the graph as it is, or merge it into
    ``torch.export.default_decompositions()`` to reach core ATen as well
    (for inference graphs: in a training export, torch's default table
    drops ``.detach()``, which gives DoRA's A and B wrong gradients, as it
    does for any module dividing by a detached norm).
    The graph was checked when it was exported; the decompositions check
    nothing again.
    """
    return {
        ops.lowrank_linear.default: _lowrank_linear,
        ops.lowrank_linear_with_intermediate.default: lowrank_forward,
        ops.lora_linear.default: _lora_linear,
        ops.lora_linear_with_intermediate.default: lora_forward,
    }
