"""Between peft and lowrank_ext.

``from_peft`` swaps a peft model's LoRA Linear layers for ``LoRALinear``: a
model loaded or trained with peft keeps peft's checkpoints, tooling and
configuration, and each adapted ``nn.Linear`` then runs the fused
``lora_linear`` op (one call instead of peft's three products and two
additions), sharing the base weights and taking the adapter's weights,
scaling, dropout and merge state as they are.

``save_peft_adapter`` goes the other way: it writes the adapters of a model
that uses ``LoRALinear`` as a peft adapter directory, which
``PeftModel.from_pretrained`` loads onto the original model.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings

import torch
from torch import nn

from ._modules import (Swaps, check_backward_hooks_combine, compiled_original,
                       GATHER_FIRST, has_own_forward, is_conv1d, is_sharded,
                       keeps_encoder_flags, places_of, stacklevel_outside_package,
                       weights_tied_elsewhere)
from ._names import preview
from .attention import SplitMultiheadAttention
from .selection import attention_holding
from .lora import ORIGINAL, STANDING_IN, _check_model, _require_adapters, adapter_parameters
from .lora_layer import LoRALinear
from .nn import LowRankLinear, check_no_instance_forward
from .files import atomic_write_files, check_path
from .serialization import separate_memory


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:
        raise ImportError("from_peft: needs peft (pip install peft)") from exc
    return LoraLayer


def _held_adapters(layer):
    """The adapters a peft LoRA layer holds (an Embedding's in lora_embedding_A)."""
    return set(layer.lora_A.keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


def _choose_adapter(layers, adapter):
    names = sorted(set().union(*(_held_adapters(layer) for layer in layers.values())))
    if adapter is None:
        if len(names) != 1:
            raise ValueError(f"from_peft: the model holds adapters {names}; choose one with "
                             "adapter=")
        return names[0]
    if not isinstance(adapter, str):
        raise TypeError(f"from_peft: adapter must be a str, got {type(adapter).__name__}")
    if adapter not in names:
        raise ValueError(f"from_peft: no adapter named {adapter!r} (the model holds {names})")
    return adapter


def _active_beside(layers, adapter):
    """Per layer where peft runs ``adapter`` together with others, those others."""
    together = {}
    for name, layer in layers.items():
        active = getattr(layer, "active_adapters", None) or []
        if adapter in active and not bool(getattr(layer, "disable_adapters", False)):
            others = {a for a in active if a != adapter and a in _held_adapters(layer)}
            if others:
                together[name] = others
    return together


def _check_supported(name, layer, adapter):
    base = layer.get_base_layer()
    conv1d = is_conv1d(base)
    holds = adapter in _held_adapters(layer)
    if hasattr(layer, "lora_E"):
        # AdaLoRA's layers derive from LoraLayer but hold A·diag(E)·B.
        raise TypeError(f"from_peft: layer {name!r} is peft's {type(layer).__name__} "
                        "(AdaLoRA, whose adapters hold singular values lora_E), which "
                        "LoRALinear does not implement; only LoRA layers convert")
    linear = isinstance(base, nn.Linear) or conv1d
    if not linear and holds:
        raise TypeError(f"from_peft: layer {name!r} adapts a {type(base).__name__}; only "
                        "nn.Linear and transformers Conv1D base layers convert")
    if linear:
        # (Before the subclass check below, which counts an instance forward.)
        check_no_instance_forward("from_peft", f"the base of layer {name!r}", base)
    if linear and not conv1d and has_own_forward(base):
        # peft's layer calls its base layer; LoRALinear computes with the
        # base's weight and bias, which would skip that forward.
        raise TypeError(f"from_peft: layer {name!r} adapts a {type(base).__name__}, a subclass "
                        "of nn.Linear with its own forward, which LoRALinear would not call; "
                        "only nn.Linear (and subclasses that keep its forward) and "
                        "transformers Conv1D base layers convert")
    if linear and bool(getattr(layer, "fan_in_fan_out", False)) != conv1d:
        # LoRALinear reads a Conv1D's weight transposed and an nn.Linear's as
        # it is; peft follows its fan_in_fan_out flag instead.
        raise ValueError(f"from_peft: layer {name!r} has fan_in_fan_out="
                         f"{bool(getattr(layer, 'fan_in_fan_out', False))} over a "
                         f"{type(base).__name__}; only the layout of the base layer converts")
    merged = list(getattr(layer, "merged_adapters", []))
    if any(m != adapter for m in merged):
        # Also where the chosen adapter is absent: the layer would come back
        # as its base with another adapter folded in.
        raise ValueError(f"from_peft: layer {name!r} has other adapters merged into its base "
                         f"weight ({merged}); unmerge them first")
    if bool(getattr(layer, "disable_adapters", False)):
        raise ValueError(
            f"from_peft: layer {name!r} has its adapters disabled in peft "
            "(disable_adapter_layers(), or inside disable_adapter()); convert with them "
            "enabled, and use lx.disable_lora(model) for the base model's outputs")
    if adapter not in layer.lora_A:
        return base  # it holds other adapters only: its plain base comes back
    if not all(isinstance(getattr(layer, part)[adapter], nn.Linear)
               for part in ("lora_A", "lora_B")):
        raise TypeError(f"from_peft: layer {name!r} holds its {adapter!r} adapter as "
                        f"{type(layer.lora_A[adapter]).__name__} / "
                        f"{type(layer.lora_B[adapter]).__name__}, not the nn.Linear pair of a "
                        "LoRA layer; only LoRA layers convert")
    p = _dropout_p(layer.lora_dropout[adapter])
    if not 0.0 <= p < 1.0:
        raise ValueError(f"from_peft: layer {name!r} has lora_dropout {p} for {adapter!r}; "
                         "LoRALinear takes a dropout in [0, 1) (at 1 the adapter never acts "
                         "in training)")
    scale = layer.scaling[adapter]
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"from_peft: layer {name!r} has scaling {scale!r} for {adapter!r} "
                         f"(lora_alpha {layer.lora_alpha[adapter]!r}, r {layer.r[adapter]!r}); "
                         "LoRALinear takes a finite scale")
    # Older peft releases lack some of these per-adapter dicts.
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not _is_dora(layer, adapter):
        raise ValueError(f"from_peft: layer {name!r} uses a LoRA variant "
                         f"({type(variant).__name__}) that LoRALinear does not implement")
    if _is_dora(layer, adapter) and adapter in getattr(layer, "merged_adapters", []) \
            and f"{adapter}-weight_norm" not in getattr(layer, "_caches", {}):
        raise ValueError(f"from_peft: layer {name!r} has its DoRA adapter merged without the "
                         "weight norm peft keeps for unmerging; unmerge it in peft first")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"from_peft: layer {name!r} has a bias in its lora_B "
                         "(lora_bias=True), which LoRALinear does not implement")
    return base


def _is_modules_to_save_wrapper(module):
    """peft's wrapper of a module trained in full (``modules_to_save``), by its
    class name, so that peft need not be imported to ask."""
    return type(module).__name__ == "ModulesToSaveWrapper" and hasattr(module, "modules_to_save")


def _other_peft_wrappers(model):
    """Names of peft's auxiliary wrappers other than ModulesToSaveWrapper in
    ``model`` (a TrainableTokensWrapper, from ``trainable_token_indices``),
    by class names, so that peft need not be imported to ask."""
    def kinds(module):
        return {cls.__name__ for cls in type(module).__mro__}

    return [name for name, m in model.named_modules()
            if ("AuxiliaryTrainingWrapper" in kinds(m) or "TrainableTokensLayer" in kinds(m))
            and not _is_modules_to_save_wrapper(m)]


def _is_dora(layer, adapter):
    """Whether peft's layer runs ``adapter`` as DoRA (it has a magnitude vector)."""
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    return magnitudes is not None and adapter in magnitudes


def _random_streams_kept(device):
    """Keep torch's random state (the CPU's and ``device``'s) as it is across
    the block: a conversion must not change the dropout masks and inits drawn
    after it."""
    accelerator = device.type not in ("cpu", "meta")
    return torch.random.fork_rng(devices=[device] if accelerator else [],
                                 device_type=device.type if accelerator else "cuda")


def _peft_config_init(*holders_and_adapter):
    """The adapter's ``init_lora_weights`` in the config of the first of the
    holders (a PeftModel, its LoraModel) that has one; None without."""
    *holders, adapter = holders_and_adapter
    for holder in holders:
        configs = getattr(holder, "peft_config", None)
        if isinstance(configs, dict) and adapter in configs:
            return getattr(configs[adapter], "init_lora_weights", None)
    return None


def _convert(layer, base, adapter, cast_notes):
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    p = _dropout_p(layer.lora_dropout[adapter])
    flags = {param: param.requires_grad for param in base.parameters()}
    # peft also takes ranks beyond min(in, out) and any lora_alpha, which
    # LoRALinear's own checks refuse as likely mistakes: build it with values
    # it takes, then give it peft's (A and B are replaced below).
    rank, alpha = int(layer.r[adapter]), float(layer.lora_alpha[adapter])
    with _random_streams_kept(base.weight.device):  # its random A is replaced at once
        new = LoRALinear(base, min(rank, A.shape[1], B.shape[0]), dropout=p,
                         rslora=bool(getattr(layer, "use_rslora", {}).get(adapter, False)))
    new.rank, new.alpha = rank, alpha
    for param, flag in flags.items():  # LoRALinear froze them; keep peft's setting
        param.requires_grad_(flag)
    # peft's set_scale / scale_layer may have moved the scaling off alpha / r.
    # It is the layer's starting scale, not one that changes between calls
    # (which LoRALinear keeps out of its fused op under torch.compile).
    new.scale = float(layer.scaling[adapter])
    new._scale_changed = False
    dtype = base.weight.dtype
    if A.dtype != dtype or B.dtype != dtype:
        cast_notes.add((A.dtype, dtype))

    def ours(t):
        """``t`` in the base's dtype, as an ordinary tensor: a cast made under
        the caller's torch.inference_mode() would give an inference tensor,
        which could never be trained nor loaded into (as in LoRALinear)."""
        with torch.inference_mode(False):
            t = t.detach()
            return (t.clone() if t.is_inference() else t).to(dtype)

    new.A = nn.Parameter(ours(A), requires_grad=A.requires_grad)
    new.B = nn.Parameter(ours(B), requires_grad=B.requires_grad)
    new.merged = adapter in getattr(layer, "merged_adapters", [])
    if _is_dora(layer, adapter):
        magnitude = layer.lora_magnitude_vector[adapter].weight
        new.magnitude = nn.Parameter(ours(magnitude), requires_grad=magnitude.requires_grad)
        if new.merged:  # the unmerged weight's norm, which unmerge needs
            new.register_buffer("_dora_norms", ours(layer._caches[f"{adapter}-weight_norm"]),
                                persistent=False)
    new.train(layer.training)
    return new


@keeps_encoder_flags
def from_peft(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Replace every peft LoRA ``Linear`` layer of ``model`` by a :class:`LoRALinear`, in place.

    Args:
        model: a ``PeftModel`` (its base model is converted and returned) or any
            module holding peft LoRA layers.
        adapter: the adapter to carry over; may be omitted when the model holds
            only one. Layers without it get their plain base layer back. Other
            adapters peft runs together with it (``set_adapter`` with a list)
            are left out, with a warning.

    The base layers are shared, not copied. Each ``LoRALinear`` takes the
    adapter's ``A`` and ``B`` (with their ``requires_grad``), peft's scaling
    (also after ``set_scale``), the dropout probability and whether the adapter
    is merged into the base weight. Adapters kept in another dtype than their
    base layer (peft keeps float32 adapters on half-precision bases) are cast
    to the base layer's dtype, with a warning: ``lora_linear`` takes one dtype.

    DoRA adapters become DoRA ``LoRALinear`` layers with peft's magnitude.
    Everything is checked and built before any module is swapped: other
    variants, ``lora_bias``, base layers other than ``nn.Linear`` and
    transformers' ``Conv1D`` (taken with ``fan_in_fan_out=True``, as peft
    requires), subclasses of ``nn.Linear`` with a forward of their own (which
    ``LoRALinear`` would not call) raise and leave the model as it was.

    Returns:
        The converted module (``model``, or the model a ``PeftModel`` or
        ``LoraModel`` wraps).
    """
    LoraLayer = _lora_layer_type()
    _check_model("from_peft", model, swaps_layers=True)
    # A compiled PeftModel: its config and the model it wraps are inside.
    given, model = model, compiled_original(model)
    root = _peft_wrapped(model)
    layers = {name: m for name, m in root.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise ValueError("from_peft: the model has no peft LoRA layer")
    if "" in layers:
        raise TypeError("from_peft: the model is itself a LoRA layer; convert a model that "
                        "holds it")
    adapter = _choose_adapter(layers, adapter)
    bases = {name: _check_supported(name, layer, adapter) for name, layer in layers.items()}
    for name, layer in layers.items():
        holder = root.get_submodule(name.rpartition(".")[0])
        if adapter in layer.lora_A and isinstance(holder, nn.MultiheadAttention):
            # The attention reads out_proj.weight itself: the adapter never runs
            # (nor does peft's), and merge_lora would switch it on.
            kind, remedy = attention_holding(holder)
            raise TypeError(
                f"from_peft: layer {name!r} is the out_proj of the {kind} at "
                f"{name.rpartition('.')[0]!r}, which reads its weight directly, so the "
                "adapter there never runs (in peft either)"
                + (remedy and f"{remedy}, before get_peft_model"))
    tokens = _other_peft_wrappers(root)
    if tokens:
        # They would stay, running whichever adapter peft last made active.
        raise ValueError(
            f"from_peft: {preview(tokens)} are peft's trainable-token modules "
            "(trainable_token_indices), which cannot be converted: merge them into the "
            "embedding with peft first (merge_and_unload), or train without them")

    together = _active_beside(layers, adapter)
    cast_notes, replacements = set(), {}
    init = _peft_config_init(model, root, adapter)
    tied = weights_tied_elsewhere(root, {name: bases[name] for name, layer in layers.items()
                                         if adapter in layer.lora_A})
    for name, layer in layers.items():
        if adapter in layer.lora_A:
            replacements[name] = _convert(layer, bases[name], adapter, cast_notes)
            if _changes_base(init):  # the base holds a residual (see _peft_init)
                replacements[name].init = init
            if name in tied:  # merge() would change the other holders too
                replacements[name]._weight_tied_to = tuple(tied[name])
        else:
            replacements[name] = bases[name]
    # peft's modules_to_save wrappers run the active adapter's copy of a
    # module: the chosen adapter's copy takes their place (the original where
    # that adapter has none), so the whole model follows one adapter.
    trained_in_full = []
    for name, module in root.named_modules():
        if _is_modules_to_save_wrapper(module) and name:
            copies = module.modules_to_save
            use_copy = adapter in copies and not bool(getattr(module, "disable_adapters", False))
            replacements[name] = copies[adapter] if use_copy else module.original_module
            if use_copy:
                trained_in_full.append((copies[adapter], module.original_module))
    # Every swap is checked before the first is made, and all are undone if
    # one fails (an interrupt too): the model is converted whole or not at all.
    for name, new in replacements.items():
        check_backward_hooks_combine(name, root.get_submodule(name), new)
    # Warned before any swap: a warning turned into an error leaves the model as it was.
    if together:
        # The user named the adapter, so converting is what was asked; but
        # the converted model no longer gives the outputs peft gave.
        others = sorted(set().union(*together.values()))
        warnings.warn(
            f"from_peft: peft also runs {others} where {adapter!r} is active (set_adapter "
            f"with a list), in layer(s) {preview(list(together))}; only {adapter!r} is carried "
            "over, so the outputs leave the others' contributions out (combine them into one "
            "adapter with peft's add_weighted_adapter first to keep them)",
            stacklevel=stacklevel_outside_package())
    for old, new in sorted(cast_notes, key=str):
        warnings.warn(f"from_peft: adapters stored in {old} were cast to their base layers' "
                      f"{new} (lora_linear takes one dtype)",
                      stacklevel=stacklevel_outside_package())
    swaps = Swaps(root)
    try:
        for name, new in replacements.items():
            swaps.swap(name, new)
    except BaseException:
        swaps.undo()
        raise
    for module, original in trained_in_full:
        module._lowrank_ext_modules_to_save = True  # save_peft_adapter writes it back so
        # The original, kept beside the copy outside the module tree (no
        # parameters, no state-dict keys): disable_lora puts it in the copy's
        # place for its block, as peft's disable_adapter() does.
        object.__setattr__(module, ORIGINAL, original)
    # What save_peft_adapter writes back into the adapter's config by default.
    root._lowrank_ext_peft_config = _peft_config_fields(model, root, adapter)
    # Any other compiled model stays the compiled model it was given.
    return given if root is model else root


def _peft_config_fields(*holders_and_adapter):
    """``base_model_name_or_path``, ``task_type``, ``bias`` and
    ``layer_replication`` of the adapter's config in the first of the holders
    that has one (None each without)."""
    *holders, adapter = holders_and_adapter
    for holder in holders:
        configs = getattr(holder, "peft_config", None)
        if isinstance(configs, dict) and adapter in configs:
            config = configs[adapter]
            task = getattr(config, "task_type", None)
            bias = getattr(config, "bias", None)
            # peft built the model's extra layers from these ranges of the
            # original's; a config without them loads into the original's
            # layers only and drops the adapters of the others without a word.
            replication = getattr(config, "layer_replication", None)
            return {"base_model_name_or_path": getattr(config, "base_model_name_or_path", None),
                    "task_type": None if task is None else str(getattr(task, "value", task)),
                    "bias": bias if bias in ("all", "lora_only") else None,
                    "layer_replication": (None if not replication else
                                          [[int(start), int(end)] for start, end in replication])}
    return {"base_model_name_or_path": None, "task_type": None, "bias": None,
            "layer_replication": None}


def _peft_wrapped(model):
    """The model a peft ``PeftModel`` or tuner (``LoraModel``) wraps, whose
    names are the ones peft's files use (``base_model.model.<name>``); any
    other model as it is."""
    module = type(model).__module__
    if not (module == "peft" or module.startswith("peft.")):
        return model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


# --- to peft -----------------------------------------------------------------------
def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _target_modules(adapters, module_names):
    """peft's target_modules naming exactly the adapted layers.

    peft matches a list entry against every module whose name ends with
    ``"." + entry``; where such a module is not adapted here (a top-level
    ``fc`` beside ``block.fc``) the list would give it an adapter too, so a
    regular expression matching the full names is written instead.
    """
    names = list(adapters)
    if any(other not in adapters and other.endswith("." + name)
           for name in names for other in module_names):
        return "(" + "|".join(re.escape(name) for name in names) + ")"
    return names


def _pattern_key(name, module_names):
    """A rank_pattern / alpha_pattern key that peft applies to module ``name`` alone.

    peft reads each key as a regular expression matched against the end of a
    module's full name after any dotted prefix (``(.*\\.)?(key)$``), so a bare
    ``fc`` also sets the rank or alpha of ``block.fc``. Where the bare name
    would match another module (or not ``name`` itself), the key is the
    escaped name anchored with ``^``, which the prefix cannot precede: it
    matches ``name`` only. Bare names are kept where they are exact, as they
    read best.
    """
    try:
        matched = {other for other in {name, *module_names}
                   if re.match(rf"(.*\.)?({name})$", other)}
    except re.error:  # a name that is no valid expression as it stands
        matched = None
    return name if matched == {name} else "^" + re.escape(name)


def _adapter_config(adapters, base_model_name_or_path, module_names=()):
    """peft's LoraConfig fields for these adapters (the most common rank and
    alpha, the others as rank_pattern / alpha_pattern)."""
    for option in ("rslora", "dropout"):
        seen = {name: (lora.rslora if option == "rslora" else _dropout_p(lora.dropout))
                for name, lora in adapters.items()}
        if len(set(seen.values())) > 1:
            raise ValueError(f"save_peft_adapter: peft keeps one {option} setting per adapter, "
                             f"but the layers differ: {seen}")
    for name, lora in adapters.items():
        expected = lora.alpha / (math.sqrt(lora.rank) if lora.rslora else lora.rank)
        if not math.isclose(lora.scale, expected, rel_tol=1e-12):
            raise ValueError(
                f"save_peft_adapter: layer {name!r} has scale {lora.scale}, not alpha / "
                f"{'√rank' if lora.rslora else 'rank'} = {expected}; a peft config cannot "
                "express it")
    factored = [name for name, lora in adapters.items() if isinstance(lora.base, LowRankLinear)]
    if factored:
        raise ValueError(
            f"save_peft_adapter: layer(s) {preview(factored)} adapt a LowRankLinear, which "
            "peft cannot load an adapter onto; save the adapters with lx.lora_state_dict(model)")
    dora = {name: lora.use_dora for name, lora in adapters.items()}
    if len(set(dora.values())) > 1:
        raise ValueError("save_peft_adapter: peft keeps one use_dora setting per adapter, but "
                         f"the layers differ: {dora}")
    # peft sets fan_in_fan_out for each layer by its kind as it builds it
    # (False for nn.Linear, True for Conv1D, with a warning where the config
    # says otherwise), so one setting serves a model adapting both.
    transposed = {name: is_conv1d(lora.base) for name, lora in adapters.items()}
    rank = _most_common([lora.rank for lora in adapters.values()])
    alpha = _most_common([lora.alpha for lora in adapters.values()])
    first = next(iter(adapters.values()))
    init = _peft_init(adapters)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": _dropout_p(first.dropout),
        "use_rslora": first.rslora,
        "use_dora": first.use_dora,
        "target_modules": _target_modules(adapters, module_names),
        "rank_pattern": {_pattern_key(n, module_names): a.rank
                         for n, a in adapters.items() if a.rank != rank},
        "alpha_pattern": {_pattern_key(n, module_names): a.alpha
                          for n, a in adapters.items() if a.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": any(transposed.values()),
        "init_lora_weights": init,
    }


# peft's inits that leave a residual in the base weight; of those, the ones
# peft redoes identically from the original weights when it loads an adapter
# (an exact SVD, a QR), so that the config may name them.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_REBUILT_INITS = ("pissa", "olora")


def _changes_base(init):
    """Whether peft's ``init`` left a residual in the base weight: one of the
    names above, or one of them with options (``pissa_niter_4``)."""
    return isinstance(init, str) and any(init == name or init.startswith(f"{name}_")
                                         for name in _BASE_CHANGING_INITS)


def _peft_init(adapters):
    """peft's ``init_lora_weights`` for these adapters.

    Loading overwrites A and B, so for the random inits any value serves.
    PiSSA (and OLoRA, from :func:`from_peft`) also left a residual in each
    base weight, which peft rebuilds from the original weights when the
    config names the init (the same decomposition, before it loads the
    trained A and B); written as anything else, peft would add the adapters
    to the whole original weight.
    """
    changing = {name: lora.init for name, lora in adapters.items()
                if _changes_base(lora.init)}
    if not changing:
        return True
    unbuilt = {name: init for name, init in changing.items() if init not in _REBUILT_INITS}
    if unbuilt:
        name, init = next(iter(unbuilt.items()))
        raise ValueError(
            f"save_peft_adapter: layer {name!r} was initialised with init={init!r}, which "
            "left a residual in its base weight that peft would not rebuild the same when "
            "it loads the adapter (a randomized SVD, or data it does not have); save the "
            "merged model (lx.merge_lora), or the adapters with lx.lora_state_dict and the "
            "base weights with the model's state_dict")
    inits = set(changing.values())
    if len(changing) < len(adapters) or len(inits) > 1:
        by_init = {}
        for name, lora in adapters.items():
            by_init.setdefault(lora.init if _changes_base(lora.init) else "a random init",
                               []).append(name)
        raise ValueError(
            "save_peft_adapter: peft keeps one init_lora_weights per adapter and would "
            "rebuild the same residual in every layer, but the layers differ: "
            + "; ".join(f"{preview(names)} {init!r}" for init, names in by_init.items()))
    return inits.pop()


def _dropout_p(module):
    """The probability of a dropout module (peft's and ours), 0 for nn.Identity."""
    return module.p if isinstance(module, nn.Dropout) else 0.0


def _modules_to_save(model, modules_to_save):
    """{name: module} for ``save_peft_adapter``'s ``modules_to_save``, checked,
    plus the modules :func:`from_peft` took from peft's modules_to_save."""
    converted = [name for name, m in model.named_modules()
                 if getattr(m, "_lowrank_ext_modules_to_save", False) and name]
    if modules_to_save is None:
        modules_to_save = []
    names = [modules_to_save] if isinstance(modules_to_save, str) else modules_to_save
    try:
        names = list(names)
    except TypeError:
        raise TypeError("save_peft_adapter: modules_to_save must be a module name or a list of "
                        f"them, got {type(modules_to_save).__name__}") from None
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(name, str):
            raise TypeError("save_peft_adapter: modules_to_save must hold module names (str), "
                            f"got {type(name).__name__}")
        if name not in modules or not name:
            raise ValueError(f"save_peft_adapter: modules_to_save names {name!r}, which is not "
                             "a submodule of the model")
    peft_names = _peft_module_names(modules)
    found = {}
    for name in [*names, *converted]:
        if name in found:
            continue
        given = "names" if name in names else "would hold (from from_peft)"
        if any(isinstance(m, LoRALinear) for m in modules[name].modules()):
            raise ValueError(f"save_peft_adapter: modules_to_save {given} {name!r}, which holds "
                             "LoRA adapters; peft trains a module either in full or through "
                             "adapters")
        inside = next((other for other, m in modules.items() if isinstance(m, LoRALinear)
                       and name.startswith(f"{other}." if other else "")), None)
        if inside is not None:
            # peft's file would hold it under a name no peft model has (the
            # adapted layer's base is its base_layer there), and peft would
            # drop it without a word.
            raise ValueError(f"save_peft_adapter: modules_to_save {given} {name!r}, which is "
                             f"inside the LoRA layer {inside!r}; peft trains a module either "
                             "in full or through an adapter, and its base stays frozen")
        # peft wraps every module whose name ends with a modules_to_save entry,
        # dot or not ("head" takes "subhead"), and adapts no layer named by the
        # entry or below it ("block.head", "head.fc"): an adapted layer (or a
        # part of one, or a module holding one) taken so fails to load, or
        # loads without its adapter. A plain module taken too is written as
        # well (peft's load expects its state in the file), as it is.
        clash = [other for other, holds_adapter in peft_names.items() if holds_adapter
                 and ((other != name and other.endswith(name)) or _excluded_by(name, other))]
        if clash:
            raise ValueError(
                f"save_peft_adapter: modules_to_save {given} {name!r}, but peft would take "
                f"{preview(clash)} for it as well (it matches modules_to_save entries to the "
                "end of a module's name, dot or not, and adapts no layer below one), and "
                "those hold adapters; rename the modules, or save the adapters with "
                "lx.lora_state_dict(model) and the module with its state_dict")
        found[name] = modules[name]
        for other, holds_adapter in peft_names.items():
            if not holds_adapter and other != name and other.endswith(name):
                found.setdefault(other, modules[other])
    return found


def _excluded_by(entry, name):
    """Whether peft keeps module ``name`` from being adapted for the
    modules_to_save ``entry`` (peft's own test, the entry read as a regular
    expression; literally where it is not a valid one)."""
    try:
        return re.match(rf"(^|.*\.){entry}($|\..*)", name) is not None
    except re.error:
        return re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", name) is not None


def _peft_module_names(modules):
    """{name: whether it is, holds or is part of an adapted layer} for the
    modules a model adapted by peft would have: those of ``modules`` ({name:
    module}) outside the LoRALinear layers, and in each of those the
    layers peft's LoRA layer holds."""
    adapted = [name for name, m in modules.items() if isinstance(m, LoRALinear)]
    names = {}
    for name, module in modules.items():
        if name and not any(name.startswith(f"{a}." if a else "") for a in adapted):
            names[name] = any(isinstance(m, LoRALinear) for m in module.modules())
    for a in adapted:
        prefix = f"{a}." if a else ""
        names.update((prefix + part, True) for part in (
            "base_layer", "lora_A", "lora_A.default", "lora_B", "lora_B.default",
            "lora_dropout", "lora_dropout.default", "lora_magnitude_vector",
            "lora_magnitude_vector.default"))
    return names


def _check_single_places(model, adapters, full):
    """A ValueError for an adapter or a modules_to_save module registered under
    several names: peft wraps a module at the first of them only (it walks
    ``named_modules()``), so the others would run without it."""
    places = places_of(model)
    shared = [f"{name} (also at {', '.join(places[id(m)][1:])})"
              for name, m in {**adapters, **full}.items() if len(places[id(m)]) > 1]
    if shared:
        raise ValueError(
            "save_peft_adapter: the model holds adapters or modules_to_save modules under "
            f"several names: {preview(shared)}; peft would load each into the first of its "
            "places only, and the others would run without it. Give each place a layer of "
            "its own before adapting it, or save the adapters with lx.lora_state_dict(model)")


def _trainable_biases(model, adapters, full, trained=None):
    """The trainable parameters outside the adapters and modules_to_save:
    ``({peft key: bias}, peft's bias mode, [the others' names])``.

    peft's ``bias`` option trains biases next to the adapters and its files
    hold them under the model's names, an adapted layer's as
    ``<layer>.base_layer.bias``: ``"lora_only"`` where only adapted layers'
    biases train, ``"all"`` where others do. ``trained``: the mode of the
    peft config :func:`from_peft` converted, whose biases are written
    whatever their ``requires_grad`` now (a model frozen after training).
    """
    adapter_bias = {f"{name}.base.bias" if name else "base.bias": name
                    for name, lora in adapters.items()}
    skip = {id(p) for p in adapter_parameters(adapters).values()}
    skip.update(id(p) for module in full.values() for p in module.parameters())
    biases, others, mode = {}, [], "none"
    for key, param in model.named_parameters():
        is_bias = key.rpartition(".")[2] == "bias"
        kept = (trained == "all" and is_bias) or (trained == "lora_only" and key in adapter_bias)
        if not (param.requires_grad or kept) or id(param) in skip:
            continue
        if key in adapter_bias:
            biases[f"{adapter_bias[key]}.base_layer.bias"] = param
            mode = "all" if mode == "all" else "lora_only"
        elif is_bias:
            biases[key] = param
            mode = "all"
        else:
            others.append(key)
    return biases, mode, others


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike, *,
                      base_model_name_or_path: str | os.PathLike | None = None,
                      modules_to_save: str | list[str] | None = None) -> list[str]:
    """Write the model's ``LoRALinear`` adapters as a peft adapter directory.

    ``directory`` gets ``adapter_model.safetensors`` (``lora_A`` / ``lora_B``
    under peft's key names) and ``adapter_config.json``, which
    ``PeftModel.from_pretrained(original_model, directory)`` loads. The most
    common rank and alpha become ``r`` and ``lora_alpha``, the others
    ``rank_pattern`` / ``alpha_pattern``; dropout and rsLoRA must be the same
    in every layer, and every scale must be alpha / rank (alpha / √rank with
    rsLoRA), as a peft config cannot say otherwise.

    ``modules_to_save``: names of modules trained in full besides the
    adapters (a classifier head; peft's option of that name): their whole
    state is written too, and peft restores it. The modules that
    :func:`from_peft` took from peft's ``modules_to_save`` are always
    written. peft matches each name to the end of every module's name, dot or
    not (``head`` also takes ``subhead``) and adapts no layer below one: the
    plain modules it would take too are written as well, and a name that
    would take an adapted layer is refused. Trainable biases are written too, as peft's ``bias`` option
    does: ``"lora_only"`` where only adapted layers' biases train, ``"all"``
    where others do. Any other trainable parameter is named in a warning: a
    peft adapter cannot hold it. An adapter or module registered under
    several names is refused: peft would load it into the first of them only.

    For a model :func:`from_peft` converted, ``base_model_name_or_path``
    defaults to the one in peft's config, whose ``task_type`` and
    ``layer_replication`` are written too (peft rebuilds the replicated
    layers from the original model when it loads the adapter).

    A ``torch.compile`` model is written as the module it compiled, under
    that module's names, which peft finds in the original model; a
    ``PeftModel`` (or ``LoraModel``) converted in place by :func:`from_peft`
    as the model it wraps.

    Everything is checked and the config built before anything is written;
    each file is written to a temporary file and renamed. Returns the names
    of the adapted layers.
    """
    from safetensors.torch import save_file

    _check_model("save_peft_adapter", model)
    model = _peft_wrapped(compiled_original(model))
    directory = check_path("save_peft_adapter", directory, "directory")
    if base_model_name_or_path is not None:
        base_model_name_or_path = check_path("save_peft_adapter", base_model_name_or_path,
                                             "base_model_name_or_path")
    adapters = _require_adapters("save_peft_adapter", model)
    if "" in adapters:
        raise TypeError("save_peft_adapter: the model is itself a LoRALinear; save a model "
                        "that holds it")
    in_split = [name for name in adapters if "." in name and isinstance(
        model.get_submodule(name.rpartition(".")[0]), SplitMultiheadAttention)]
    if in_split:
        # Before anything is written: a warning turned into an error writes nothing.
        warnings.warn(
            f"save_peft_adapter: {preview(in_split)} adapt projections of a "
            "SplitMultiheadAttention (lx.split_attention), which nn.MultiheadAttention does "
            "not have: PeftModel.from_pretrained finds them only in a base model split the "
            "same way (run lx.split_attention on it before loading); into the original "
            "model peft drops them without a word, or fails to find them", stacklevel=2)
    standing_in = [name for name, m in model.named_modules() if vars(m).get(STANDING_IN)]
    if standing_in:
        raise RuntimeError(
            f"save_peft_adapter: called inside lx.disable_lora, where the originals of "
            f"{preview(standing_in)} stand in for their trained copies, which the adapter "
            "holds; save after the block")
    wrapped = [name for name, m in model.named_modules() if _is_modules_to_save_wrapper(m)]
    if wrapped:
        raise ValueError(
            f"save_peft_adapter: {preview(wrapped)} are peft ModulesToSaveWrapper modules; "
            "convert the model with lx.from_peft (which puts the adapter's copy in their "
            "place) and name them in modules_to_save=")
    tokens = _other_peft_wrappers(model)
    if tokens:
        raise ValueError(f"save_peft_adapter: {preview(tokens)} are peft modules of "
                         "trainable_token_indices, which this adapter format cannot hold here; "
                         "merge them into the embedding with peft first")
    full = _modules_to_save(model, modules_to_save)
    _check_single_places(model, adapters, full)
    converted = getattr(model, "_lowrank_ext_peft_config", {})
    biases, bias_mode, others = _trainable_biases(model, adapters, full,
                                                  converted.get("bias"))
    if others:
        warnings.warn(
            f"save_peft_adapter: {preview(others)} are trainable, but a peft adapter holds "
            "only the adapters, biases and modules_to_save, so the one written here leaves "
            "them out; name their modules in modules_to_save=, or save them separately if "
            "they were trained", stacklevel=2)
    if base_model_name_or_path is None:
        base_model_name_or_path = converted.get("base_model_name_or_path")
    config = _adapter_config(adapters, base_model_name_or_path,
                             [name for name, _ in model.named_modules()])
    config["task_type"] = converted.get("task_type")
    config["bias"] = bias_mode
    if converted.get("layer_replication"):
        config["layer_replication"] = converted["layer_replication"]
    if full:
        config["modules_to_save"] = list(full)
    config_text = json.dumps(config, indent=2)
    tensors = {}
    for name, lora in adapters.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = lora.A.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = lora.B.detach().contiguous()
        if lora.use_dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = lora.magnitude.detach().contiguous()
    for name, module in full.items():
        for key, value in module.state_dict().items():
            tensors[f"base_model.model.{name}.{key}"] = value.detach().contiguous()
    for key, value in biases.items():
        tensors[f"base_model.model.{key}"] = value.detach().contiguous()
    sharded = [key for key, value in tensors.items() if is_sharded(value)]
    if sharded:
        raise ValueError(f"save_peft_adapter: {sharded[0]} is {GATHER_FIRST}")
    meta = [key for key, value in tensors.items() if value.is_meta]
    if meta:
        raise ValueError(f"save_peft_adapter: {meta[0]} is on the meta device and holds no "
                         "values; materialize the model (model.to_empty(device=...)) and load "
                         "its weights first")
    # Tied modules to save: peft's loader takes each key from the file, so
    # each is written whole.
    tensors = separate_memory(tensors)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_peft_adapter: {directory} exists and is not a directory")

    def write_config(tmp):
        with open(tmp, "w") as f:
            f.write(config_text)

    made = _directories_to_make(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        # Both files or neither: new weights beside an old config would not load.
        atomic_write_files(
            [(os.path.join(directory, "adapter_model.safetensors"),
              lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})),
             (os.path.join(directory, "adapter_config.json"), write_config)],
            owner="save_peft_adapter")
    except BaseException:
        for path in made:  # the directories made here, deepest first, where still empty
            try:
                os.rmdir(path)
            except OSError:
                break
        raise
    return list(adapters)


def _directories_to_make(directory):
    """The directories ``os.makedirs(directory)`` would create, deepest first."""
    made, path = [], os.path.abspath(directory)
    while not os.path.exists(path):
        made.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return made


