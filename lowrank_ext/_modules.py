"""Replacing a named submodule in place, and the layer kinds compression replaces."""

import sys


def replace_module(model, name, new):
    """Put ``new`` in place of the submodule called ``name``; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


# transformers' Conv1D (GPT-2 and its relatives) is a linear layer that keeps
# its weight transposed: y = x·W + b with W of shape (in, out). Compression
# treats it as the nn.Linear with weight Wᵀ. It is looked up only when
# transformers is already imported: a model holding one imported it.
def _conv1d_type():
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module):
    conv1d = _conv1d_type()
    return conv1d is not None and type(module) is conv1d


def dense_weight(layer):
    """The layer's weight as an (out, in) matrix: ``weight``, or its transpose for a Conv1D."""
    return layer.weight.T if is_conv1d(layer) else layer.weight
