"""svd_truncate's differentiable form, run eagerly where the caller is being
compiled.

A module of its own, imported by ``svd_truncate`` only while torch.compile
traces it: ``torch.compiler.disable`` imports ``torch._dynamo`` (about a
second), which ``import lowrank_ext`` should not pay for every user.
"""

from __future__ import annotations

import torch

from .svd import _differentiable


@torch.compiler.disable
def differentiable_outside_compile(W, rank, balanced):
    """:func:`lowrank_ext.svd._differentiable` outside the graph (a graph
    break; under ``fullgraph=True`` torch.compile says so): traced, the op
    would give factors that claim a gradient and pass none back to W."""
    return _differentiable(W, rank, balanced)
