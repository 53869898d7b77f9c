"""Which layers a call acts on: the plain ``nn.Linear`` layers of a model, those
left alone and why, and the include/exclude glob patterns that select among them.

Shared by compress_model, add_lora, split_attention, distill and the file
commands, so that a pattern means the same everywhere (peft's habit: a name
matches in full or as a dotted suffix).
"""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.nn.utils import parametrize

from ._modules import (COMPILED_ALONE_WHY, compiled_alone, held_besides_weight, instance_forward,
                       instance_forward_text, is_conv1d, places_of)
from ._names import owner_prefix, preview
from .lora_layer import LoRALinear


def as_patterns(name, patterns, owner="compress_model"):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"{owner_prefix(owner)}{name} must be a string or a list of strings, got "
                        f"{type(patterns).__name__}") from None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{owner_prefix(owner)}{name} must be a non-empty string or list of "
                        "strings")
    return patterns


def adapter_bases(model):
    """Ids of the layers that are the base of a ``LoRALinear`` in ``model``:
    swapping one would take the adapter's base away from under it."""
    return {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}


def plain_linears(model, *, conv1d=False, replacing=False):
    """{name: module} for every ``nn.Linear`` (not a subclass) of the model.

    Subclasses are left out because their owners may read their weight
    directly (``nn.MultiheadAttention`` passes ``out_proj.weight`` to its
    functional form, never calling the layer); so are parametrized layers
    and plain ones a layer in their place would not stand for (see
    :func:`left_alone_linears`; ``replacing`` as there). The frozen base
    layer inside a ``LoRALinear`` is not one of them either: swapping it
    would take the adapter's base away from under it. With ``conv1d``,
    transformers' ``Conv1D`` layers (a Linear with its weight transposed)
    are included.
    """
    owned = adapter_bases(model) | compiled_alone(model)
    return {name: m for name, m in model.named_modules()
            if (type(m) is nn.Linear or (conv1d and is_conv1d(m))) and id(m) not in owned
            and not_standing_for(m, replacing) is None}


def not_standing_for(layer, replacing=True):
    """Why a layer put in the place of ``layer`` (a plain nn.Linear or Conv1D)
    would not stand for it, or None: a forward set on the instance
    (accelerate's hooks for device_map and offloading), which neither a
    LowRankLinear nor a LoRALinear (which reads its base's weight) would run;
    or, where ``replacing`` it (compress_model, load_compressed: add_lora's
    LoRALinear keeps the layer whole as its base), parameters, buffers or
    submodules besides its weight and bias, which a LowRankLinear in its
    place would lose."""
    kind = "an nn.Linear" if type(layer) is nn.Linear else f"a {type(layer).__name__}"
    if instance_forward(layer):
        return (f"{kind} with {instance_forward_text(layer)}, which a layer in its place "
                "would never run (it reads the weight and bias instead)")
    if replacing:
        held = held_besides_weight(layer)
        if held:
            return (f"{kind} holding {', '.join(held)} besides its weight and bias, which "
                    "a LowRankLinear in its place would lose")
    return None


def left_alone_linears(model, *, replacing=False):
    """{name: (module, why)} for the ``nn.Linear`` layers :func:`plain_linears`
    leaves out, other than adapters' bases: subclasses of ``nn.Linear``, and
    layers with a parametrization (``weight_norm``, ``spectral_norm``,
    ``orthogonal``, ...), which torch makes instances of a subclass. Their
    weight is not simply used as it is stored, so a LowRankLinear (or an
    adapter) in their place would compute something else; ``why`` says so, for
    reports and error messages. Also layers that ``torch.compile`` wraps on
    their own (:func:`compiled_alone`): one put in their place would never run;
    and plain layers (Conv1D too) that a layer in their place would not stand
    for (:func:`not_standing_for`; ``replacing`` as there, False for
    add_lora, which wraps layers)."""
    owned = adapter_bases(model)
    compiled = compiled_alone(model)
    found = {}
    for name, m in model.named_modules():
        if id(m) in compiled and (isinstance(m, nn.Linear) or is_conv1d(m)) and id(m) not in owned:
            found[name] = (m, COMPILED_ALONE_WHY)
            continue
        if (type(m) is nn.Linear or is_conv1d(m)) and id(m) not in owned:
            why = not_standing_for(m, replacing)
            if why is not None:
                found[name] = (m, why)
            continue
        if type(m) is nn.Linear or not isinstance(m, nn.Linear) or id(m) in owned:
            continue
        if parametrize.is_parametrized(m):
            original = type(m).__mro__[1]  # torch's Parametrized<cls> derives from cls
            kind = ("nn.Linear" if original is nn.Linear
                    else f"{original.__name__}, a subclass of nn.Linear,")
            how = "; ".join(f"{tensor}: {', '.join(type(p).__name__ for p in chain)}"
                            for tensor, chain in m.parametrizations.items())
            why = (f"a parametrized {kind} ({how}), computing those tensors at every use; "
                   "torch.nn.utils.parametrize.remove_parametrizations makes it a plain layer")
        else:
            holder = model.get_submodule(name.rpartition(".")[0]) if name else None
            why = (f"{type(m).__name__}, a subclass of nn.Linear: "
                   + ("the {} holding it reads its weight directly{}".format(
                       *attention_holding(holder))
                      if isinstance(holder, nn.MultiheadAttention) else
                      "its forward, or the module holding it, may use the weight otherwise "
                      "than nn.Linear does"))
        found[name] = (m, why)
    return found


def attention_holding(holder):
    """(name, remedy) for messages about the out_proj of an
    nn.MultiheadAttention, which reads that layer's weight directly: the
    class itself is split by lx.split_attention; a subclass, which
    split_attention leaves alone, is named as what it is, with no remedy."""
    if type(holder) is nn.MultiheadAttention:
        return ("nn.MultiheadAttention",
                "; lx.split_attention(model) first makes it a plain nn.Linear")
    return (f"{type(holder).__name__} (a subclass of nn.MultiheadAttention, which "
            "lx.split_attention leaves alone)", "")


def name_matches(name, pattern):
    """True when a module name matches a glob pattern, in full or as a dotted suffix.

    ``"query"`` matches ``"encoder.layer.0.attention.self.query"`` (peft's
    target_modules habit); ``"encoder.*.dense"`` matches with fnmatch rules.
    A pattern equal to the name (or its dotted suffix) matches too, as in
    peft: a name holding glob characters (a ModuleDict key ``"x[1]"``) is
    matched by itself, where fnmatch reads ``[1]`` as a character class.
    """
    return (name == pattern or name.endswith("." + pattern)
            or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern))


def _listed(why):
    """``name (why)`` for each of ``{name: why}``, shortened; the model itself has no name."""
    return preview(f"{name or 'the model'} ({text})" for name, text in why.items())


def left_alone_suffix(model, *, replacing=False):
    """`` (left alone: name (why), ...)`` naming the model's layers left alone, or ""."""
    alone = {name: why
             for name, (_, why) in left_alone_linears(model, replacing=replacing).items()}
    return f" (left alone: {_listed(alone)})" if alone else ""


_COMPILED_CHILD = "._orig_mod"


def select_names(names, include=None, exclude=None, *, owner="compress_model", what="layer",
                 aliases=None, left_alone=None):
    """The names kept by include/exclude glob patterns; a pattern matching nothing is an error.

    ``aliases`` ({name: every name of that module}) lets a pattern match a
    module by any of its names. ``left_alone`` ({name: why}) marks names the
    caller will not touch: they are kept like the others (a report lists
    them), and an exclude pattern may match them alone, but an include
    pattern that does is a TypeError saying why, and a selection of them
    alone is an error.
    """
    include = as_patterns("include", include, owner)
    exclude = as_patterns("exclude", exclude, owner)
    aliases = aliases or {}
    left_alone = left_alone or {}

    def names_of(name):
        names = aliases.get(name, (name,))
        if name in left_alone:
            # A module torch.compile wraps on its own is named through the
            # wrapper's _orig_mod; the user knows it by the wrapper's name,
            # and should hear why it is left alone rather than of no match.
            names = (*names, *(n[:-len(_COMPILED_CHILD)] for n in names
                               if n.endswith(_COMPILED_CHILD)))
        return names

    def matches(name, pattern):
        return any(name_matches(n, pattern) for n in names_of(name))

    usable = [n for n in names if n not in left_alone]
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if any(matches(n, pattern) for n in usable):
                continue
            alone = [n for n in left_alone if matches(n, pattern)]
            if alone and label == "include":
                raise TypeError(f"{owner_prefix(owner)}include pattern {pattern!r} matches only "
                                f"layers left alone: {_listed({n: left_alone[n] for n in alone})}")
            if not alone:
                raise ValueError(
                    f"{owner_prefix(owner)}{label} pattern {pattern!r} matches no {what} "
                    f"(candidates: {preview(a for n in usable for a in aliases.get(n, (n,)))})")
    chosen = [n for n in names
              if (include is None or any(matches(n, p) for p in include))
              and not any(matches(n, p) for p in exclude or ())]
    if all(n in left_alone for n in chosen):
        alone = (f" (only layers left alone: {_listed({n: left_alone[n] for n in chosen})})"
                 if chosen else "")
        raise ValueError(f"{owner_prefix(owner)}include/exclude leave no {what} selected{alone}")
    return chosen


def select_layers(model, layers, include=None, exclude=None, *, owner="compress_model",
                  what="layer", replacing=False):
    """(chosen, left): the names of ``layers`` ({name: module}, as named_modules()
    names them) that include/exclude select, and those of the layers left
    alone (:func:`left_alone_linears`, ``replacing`` as there) that they
    select, {name: (module, why)}; both in the model's order.

    A module registered under several names (``m.dec = m.enc``) is matched by
    every one of them: it is selected when any of its names matches an
    include pattern, and left out when any matches an exclude pattern (one
    object, it is replaced everywhere or nowhere).
    """
    alone = left_alone_linears(model, replacing=replacing)
    places = places_of(model)
    order = [name for name, m in model.named_modules() if name in layers or name in alone]
    modules = {**{n: m for n, (m, _) in alone.items()}, **layers}
    chosen = select_names(order, include, exclude, owner=owner, what=what,
                          aliases={n: places[id(modules[n])] for n in order},
                          left_alone={n: why for n, (_, why) in alone.items()})
    return [n for n in chosen if n in layers], {n: alone[n] for n in chosen if n in alone}
