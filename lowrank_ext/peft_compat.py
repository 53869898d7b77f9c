"""From peft to lowrank_ext: swap a peft model's LoRA Linear layers for ``LoRALinear``.

A model loaded or trained with peft keeps working with peft's checkpoints,
tooling and configuration; ``from_peft`` then puts the fused ``lora_linear``
op under each adapted ``nn.Linear`` (one call instead of peft's three
products and two additions), sharing the base weights and taking the
adapter's weights, scaling, dropout and merge state as they are.
"""

import warnings

from torch import nn

from ._modules import replace_module
from .nn import LoRALinear


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:
        raise ImportError("from_peft: needs peft (pip install peft)") from exc
    return LoraLayer


def _choose_adapter(layers, adapter):
    names = sorted({a for layer in layers.values() for a in layer.lora_A.keys()})
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


def _check_supported(name, layer, adapter):
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise TypeError(f"from_peft: layer {name!r} adapts a {type(base).__name__}; only "
                        "nn.Linear base layers convert")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"from_peft: layer {name!r} stores its weight transposed "
                         "(fan_in_fan_out=True); only nn.Linear layouts convert")
    if adapter not in layer.lora_A:
        return base
    # Older peft releases lack some of these per-adapter dicts.
    if (adapter in getattr(layer, "lora_variant", {})
            or getattr(layer, "use_dora", {}).get(adapter, False)):
        raise ValueError(f"from_peft: layer {name!r} uses a LoRA variant (DoRA or another) "
                         "that LoRALinear does not implement")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"from_peft: layer {name!r} has a bias in its lora_B "
                         "(lora_bias=True), which LoRALinear does not implement")
    merged = list(getattr(layer, "merged_adapters", []))
    if any(m != adapter for m in merged):
        raise ValueError(f"from_peft: layer {name!r} has other adapters merged into its base "
                         f"weight ({merged}); unmerge them first")
    return base


def _convert(layer, base, adapter, cast_notes):
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    flags = {param: param.requires_grad for param in base.parameters()}
    new = LoRALinear(base, layer.r[adapter], layer.lora_alpha[adapter], dropout=p,
                     rslora=bool(getattr(layer, "use_rslora", {}).get(adapter, False)))
    for param, flag in flags.items():  # LoRALinear froze them; keep peft's setting
        param.requires_grad_(flag)
    # peft's set_scale / scale_layer may have moved the scaling off alpha / r.
    new.scale = float(layer.scaling[adapter])
    dtype = base.weight.dtype
    if A.dtype != dtype or B.dtype != dtype:
        cast_notes.add((A.dtype, dtype))
    new.A = nn.Parameter(A.detach().to(dtype), requires_grad=A.requires_grad)
    new.B = nn.Parameter(B.detach().to(dtype), requires_grad=B.requires_grad)
    new.merged = adapter in getattr(layer, "merged_adapters", [])
    new.train(layer.training)
    return new


def from_peft(model, adapter=None):
    """Replace every peft LoRA ``Linear`` layer of ``model`` by a :class:`LoRALinear`, in place.

    Args:
        model: a ``PeftModel`` (its base model is converted and returned) or any
            module holding peft LoRA layers.
        adapter: the adapter to carry over; may be omitted when the model holds
            only one. Layers without it get their plain base layer back.

    The base layers are shared, not copied. Each ``LoRALinear`` takes the
    adapter's ``A`` and ``B`` (with their ``requires_grad``), peft's scaling
    (also after ``set_scale``), the dropout probability and whether the adapter
    is merged into the base weight. Adapters kept in another dtype than their
    base layer (peft keeps float32 adapters on half-precision bases) are cast
    to the base layer's dtype, with a warning: ``lora_linear`` takes one dtype.

    Everything is checked and built before any module is swapped: DoRA and
    other variants, ``lora_bias``, transposed (``fan_in_fan_out``) and
    non-Linear base layers raise and leave the model as it was.

    Returns:
        The converted module (``model``, or its base model for a ``PeftModel``).
    """
    LoraLayer = _lora_layer_type()
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_peft: model must be an nn.Module, got {type(model).__name__}")
    get_base = getattr(model, "get_base_model", None)
    root = get_base() if callable(get_base) else model
    layers = {name: m for name, m in root.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise ValueError("from_peft: the model has no peft LoRA layer")
    if "" in layers:
        raise TypeError("from_peft: the model is itself a LoRA layer; convert a model that "
                        "holds it")
    adapter = _choose_adapter(layers, adapter)
    bases = {name: _check_supported(name, layer, adapter) for name, layer in layers.items()}

    cast_notes, replacements = set(), {}
    for name, layer in layers.items():
        if adapter in layer.lora_A:
            replacements[name] = _convert(layer, bases[name], adapter, cast_notes)
        else:
            replacements[name] = bases[name]
    for old, new in sorted(cast_notes, key=str):
        warnings.warn(f"from_peft: adapters stored in {old} were cast to their base layers' "
                      f"{new} (lora_linear takes one dtype)", stacklevel=2)
    for name, new in replacements.items():
        replace_module(root, name, new)
    return root
