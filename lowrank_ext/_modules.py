"""Replacing a named submodule in place: what compression, loading and LoRA swap with."""


def replace_module(model, name, new):
    """Put ``new`` in place of the submodule called ``name``; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
