"""Replacing a named submodule in place (keeping torch's Transformer encoder
modules off the fused paths that would bypass it), and the layer kinds
compression replaces."""

import contextlib
import functools
import sys

import torch
from torch import nn


def replace_module(model, name, new):
    """Put ``new`` in place of the submodule called ``name``; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    if type(new) is not nn.Linear:
        keep_off_fused_encoder_paths(model, parent_name, new)
    return old


def places_of(model):
    """{id(module): every name it is registered under in ``model``}.

    A module may sit in several places; ``named_modules()`` lists only the first.
    """
    places = {}
    for name, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    return places


def weight_tied_elsewhere(model, layer):
    """Names of the parameters of other modules in ``model`` that are
    ``layer.weight`` itself: a tie (an output head sharing its embedding table)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return []
    return [f"{path}.{name}" if path else name
            for path, module in model.named_modules(remove_duplicate=False)
            if module is not layer
            for name, param in module._parameters.items() if param is weight]


def _run_the_module(module, args):
    """A forward pre-hook that changes nothing (see keep_off_fused_encoder_paths)."""
    return None


def keep_off_fused_encoder_paths(model, parent_name, module):
    """Make torch's Transformer encoder modules above ``module`` call it.

    In inference ``nn.TransformerEncoderLayer`` takes a fused fast path that
    reads its Linear layers' ``weight`` and ``bias`` and never calls them:
    a LoRALinear's ``weight`` is its base layer's, so the adapter would be
    silently dropped (a LoRALinear carries this hook from its construction,
    and a LowRankLinear's placeholder weight already turns the path off, but
    under fake-tensor tracing it is a plain tensor). The layer skips that path
    whenever a forward hook or pre-hook is attached to one of its submodules,
    so ``module`` gets a pre-hook that does nothing; it leaves with the module
    (``merge_lora`` puts a plain Linear back, and the fast path with it).
    ``nn.TransformerEncoder`` reads its first layer's weights too, to decide
    whether to pack a padded batch into a nested tensor, which the layers
    would then pass to ``module``: it is set to ``use_nested_tensor = False``,
    as ``enable_nested_tensor=False`` would have built it (the same outputs).
    """
    names = parent_name.split(".") if parent_name else []
    ancestors = [model] + [model.get_submodule(".".join(names[:i + 1]))
                           for i in range(len(names))]
    if any(isinstance(a, nn.TransformerEncoderLayer) for a in ancestors) and \
            _run_the_module not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_run_the_module)
    for ancestor in ancestors:
        if isinstance(ancestor, nn.TransformerEncoder):
            ancestor.use_nested_tensor = False


def _holds_swapped_layer(encoder):
    return any(_run_the_module in m._forward_pre_hooks.values() for m in encoder.modules())


@contextlib.contextmanager
def _encoder_flags_kept(model):
    # Anything but a module is the function's own error to report.
    modules = model.modules() if isinstance(model, nn.Module) else ()
    before = {m: m.__dict__["use_nested_tensor"] for m in modules
              if isinstance(m, nn.TransformerEncoder) and "use_nested_tensor" in m.__dict__}
    # Every calibration run takes the same path: the nested one is closed to
    # the probes' LowRankLinear layers, and a reference recorded on it would
    # differ from them at the padded positions (zeros there).
    for encoder in before:
        encoder.use_nested_tensor = False
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        for encoder, flag in before.items():
            if not (succeeded and _holds_swapped_layer(encoder)):
                encoder.use_nested_tensor = flag


def keeps_encoder_flags(function):
    """For a function ``f(model, ...)`` that swaps layers and, should it fail,
    leaves the model as it was. While it runs, torch's ``nn.TransformerEncoder``
    modules in the model do not pack padded batches into nested tensors (the
    flag keep_off_fused_encoder_paths sets); afterwards each gets its
    ``use_nested_tensor`` back unless a swapped-in layer stays below it, and
    every one gets it back when the function fails."""
    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        with _encoder_flags_kept(model):
            return function(model, *args, **kwargs)
    return wrapper


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


def is_linear_layer(module):
    """An ``nn.Linear`` (not a subclass) or a transformers ``Conv1D``: what
    compression swaps for a LowRankLinear."""
    return type(module) is nn.Linear or is_conv1d(module)


def dense_weight(layer):
    """The layer's weight as an (out, in) matrix: ``weight``, or its transpose for a Conv1D."""
    return layer.weight.T if is_conv1d(layer) else layer.weight
