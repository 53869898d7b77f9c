"""LoRA over a whole model: adapters on chosen Linear layers, their weights alone, merging.

``add_lora`` wraps the matching ``nn.Linear`` layers of a model (and the
``LowRankLinear`` layers of a compressed one) in ``LoRALinear`` and freezes
everything else, as peft's ``get_peft_model`` does
with ``target_modules``; ``lora_state_dict`` / ``load_lora_state_dict`` move
the adapters alone (a few MB where the model is GB); ``merge_lora`` folds
every adapter into its base layer and puts that layer back
(peft's ``merge_and_unload``); ``disable_lora`` runs the base model alone for
a while (peft's ``disable_adapter``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ._checks import dtype_name
from ._modules import (Swaps, check_backward_hooks_combine, compiled_alone, compiled_original,
                       FSDP_MERGE_WHY, dense_weight, fsdp_managed, is_conv1d,
                       keeps_encoder_flags, places_of, refuse_distributed_wrapper,
                       weights_tied_elsewhere)
from ._names import preview
from .selection import adapter_bases, left_alone_suffix, plain_linears, select_layers
from .lora_layer import LoRALinear, check_lora_init_fits_base, check_lora_options
from .nn import LowRankLinear, check_positive_int


def _check_model(owner, model, *, swaps_layers=False):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    if swaps_layers:
        refuse_distributed_wrapper(model, owner)


def _adapters(model):
    """{name: LoRALinear} in the model's order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_adapters(owner, model):
    """:func:`_adapters`, or a ValueError naming ``owner`` when the model has none."""
    adapters = _adapters(model)
    if not adapters:
        raise ValueError(f"{owner}: the model has no LoRALinear layer")
    return adapters


def adapter_parameters(adapters):
    """{state-dict key: parameter} for the A and B (and a DoRA layer's
    magnitude) of each adapter, in order."""
    params = OrderedDict()
    for name, lora in adapters.items():
        prefix = f"{name}." if name else ""
        params[prefix + "A"], params[prefix + "B"] = lora.A, lora.B
        if lora.use_dora:
            params[prefix + "magnitude"] = lora.magnitude
    return params


@keeps_encoder_flags
def add_lora(model: nn.Module, rank: int, alpha: float | None = None, *,
             include: str | Sequence[str] | None = None,
             exclude: str | Sequence[str] | None = None, init: str = "default",
             dropout: float = 0.0, rslora: bool = False, use_dora: bool = False,
             freeze: bool = True) -> list[str]:
    """Wrap the model's ``nn.Linear`` layers in :class:`LoRALinear`, in place.

    transformers' ``Conv1D`` layers (GPT-2's) are wrapped too, as peft does
    with ``fan_in_fan_out=True``, and so are :class:`LowRankLinear` layers:
    LoRA on a model that :func:`compress_model` compressed trains a small
    adapter next to each frozen pair of factors (PiSSA inits are refused
    there, as they split a dense weight).

    Args:
        model: any ``nn.Module``.
        rank, alpha, init, dropout, rslora, use_dora: as :class:`LoRALinear`,
            the same for every chosen layer.
        include, exclude: glob patterns (or lists) on module names, matched in
            full or as a dotted suffix as in :func:`compress_model` (``"query"``
            matches ``encoder.layer.0.attention.self.query``, like peft's
            ``target_modules``); default every ``nn.Linear``. ``"all-linear"``
            is peft's shorthand: every layer but a transformers model's output
            layer (``get_output_embeddings()``). Layers that are
            already the base of a ``LoRALinear`` are never chosen again.
            Subclasses of ``nn.Linear`` and parametrized layers
            (``weight_norm``, ``spectral_norm``, ...) are left alone, as
            :func:`compress_model` leaves them: an ``include`` pattern
            matching only such layers is a TypeError. A layer registered
            under several names is matched by each of them: any name
            matching ``include`` selects it, any matching ``exclude`` leaves
            it out.
        freeze: make every parameter other than the adapters' stop
            requiring gradients (peft's behaviour), so that
            ``[p for p in model.parameters() if p.requires_grad]`` is the
            adapters alone: the new ones, and those an earlier call added,
            whose flags stay as they are (several calls give layers
            different ranks). With ``False``, only the wrapped layers' own
            weights and biases are frozen.

    A layer registered under several names (one module object in several
    places) gets one adapter, placed under all of them, so every use of the
    shared layer stays the same computation.

    Every argument is checked against every chosen layer before anything
    changes; if wrapping fails (e.g. a PiSSA decomposition), the model's
    modules, weights and ``requires_grad`` flags are put back as they were.
    Returns the names of the wrapped layers.
    """
    _check_model("add_lora", model, swaps_layers=True)
    check_positive_int("add_lora", "rank", rank)
    alpha = check_lora_options("add_lora", rank, alpha, init, dropout, rslora, use_dora)
    if not isinstance(freeze, bool):
        raise TypeError(f"add_lora: freeze must be a bool, got {type(freeze).__name__}")
    if type(model) is nn.Linear or isinstance(model, LowRankLinear) or is_conv1d(model):
        what = ("an nn.Linear" if type(model) is nn.Linear else
                "a LowRankLinear" if isinstance(model, LowRankLinear) else "a Conv1D")
        raise TypeError(f"add_lora: the model is itself {what}; wrap it with "
                        "LoRALinear(model, rank) instead")
    linears = _adaptable_layers(model)
    if not linears:
        raise ValueError("add_lora: the model has no nn.Linear, Conv1D or LowRankLinear "
                         "layer to wrap" + left_alone_suffix(model))
    all_linear = isinstance(include, str) and include.lower() == "all-linear"
    # The patterns see every layer (an exclude naming the output layer, as
    # peft's configurations often do, matches it); "all-linear" then leaves
    # the output layer out.
    names, _ = select_layers(model, linears, None if all_linear else include, exclude,
                             owner="add_lora", what="nn.Linear, Conv1D or LowRankLinear layer")
    if all_linear:
        output = _output_layer(model)
        names = [name for name in names if linears[name] is not output]
        if not names:
            raise ValueError("add_lora: include='all-linear' leaves out the model's output "
                             "layer, and no other layer is left to wrap")
    for name in names:
        d, k = dense_weight(linears[name]).shape
        if not 1 <= rank <= min(d, k):
            # A classification head with fewer outputs than the rank is the
            # usual case (peft's SEQ_CLS task type leaves it out).
            advice = (f"; leave it out (exclude={name!r}, as peft's "
                      "task_type='SEQ_CLS' leaves a classifier head) or choose a rank up to "
                      f"{min(d, k)}") if rank >= 1 else ""
            raise ValueError(f"add_lora: rank must be in [1, min(out, in)] for every chosen "
                             f"layer; {name} is {d}×{k}, got rank {rank}{advice}")
        check_lora_init_fits_base("add_lora", init, linears[name], name, use_dora)
    tied = weights_tied_elsewhere(model, {name: linears[name] for name in names})
    if tied and init.startswith("pissa"):
        name, others = next(iter(tied.items()))
        raise ValueError(
            f"add_lora: init={init!r} leaves the residual in the base weight, but the weight "
            f"of {name} is tied to {', '.join(others)}, which would change too; exclude the "
            "layer or untie it first")

    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved = {}
    wrapped = {}
    try:
        for name in names:
            base = linears[name]
            if init.startswith("pissa") and not base.weight.is_meta:
                # LoRALinear leaves the residual in base.weight. In host
                # memory, as load_compressed keeps what it overwrites: on an
                # accelerator the copies would double the wrapped weights.
                # (A meta weight holds nothing to put back.)
                saved[name] = base.weight.detach().to("cpu", copy=True)
            lora = LoRALinear(base, rank, alpha, init=init, dropout=dropout, rslora=rslora,
                              use_dora=use_dora)
            lora.train(base.training)
            if name in tied:  # merge() would change the other holders too
                lora._weight_tied_to = tuple(tied[name])
            wrapped[name] = lora
        places = places_of(model)
        swaps = Swaps(model)
        try:
            for name, lora in wrapped.items():
                for place in places[id(linears[name])]:
                    swaps.swap(place, lora)
            if freeze:
                adapter = {id(p) for p in adapter_parameters(_adapters(model)).values()}
                for p in model.parameters():
                    if id(p) not in adapter:
                        # (Set, not requires_grad_(): an uninitialized
                        # LazyLinear's parameters refuse the method.)
                        p.requires_grad = False
        except BaseException:
            swaps.undo()
            raise
    except BaseException:  # a KeyboardInterrupt during a long PiSSA SVD too
        with torch.no_grad():
            for name, weight in saved.items():
                linears[name].weight.copy_(weight)
        for p, flag in flags:
            p.requires_grad = flag
        raise
    return names


def _adaptable_layers(model):
    """{name: layer} for the layers add_lora may wrap, in the model's order: plain
    ``nn.Linear`` and ``Conv1D`` layers and ``LowRankLinear`` layers, none of
    them already the base of a LoRALinear."""
    chosen = plain_linears(model, conv1d=True)
    # Nor one torch.compile wraps on its own (compiled_alone), as plain_linears.
    owned = adapter_bases(model) | compiled_alone(model)
    return {name: m for name, m in model.named_modules()
            if name in chosen or (isinstance(m, LowRankLinear) and id(m) not in owned)}


def _output_layer(model):
    """The model's output layer (``get_output_embeddings()``), which peft's
    ``"all-linear"`` leaves out; None where it declares none."""
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        return get_output() if callable(get_output) else None
    except NotImplementedError:  # a model that declares no output layer
        return None


def lora_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The ``A`` and ``B`` of every ``LoRALinear`` in ``model`` (and a DoRA
    layer's ``magnitude``), keyed as in ``model.state_dict()``.

    Tensors are detached and share memory with the parameters; save them with
    ``torch.save`` or ``safetensors.torch.save_file``. A ``torch.compile``
    model gives the names of the module it compiled (no ``_orig_mod.``
    prefix), so that the state loads into the plain model and back.
    """
    _check_model("lora_state_dict", model)
    model = compiled_original(model)
    adapters = _require_adapters("lora_state_dict", model)
    return OrderedDict((key, p.detach()) for key, p in adapter_parameters(adapters).items())


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load adapters saved by :func:`lora_state_dict` into a model with the same adapters.

    The keys must be exactly the model's adapter keys, every tensor
    floating-point and every shape the model's; nothing is loaded otherwise.
    Merged layers are refused (their base weight holds the old adapter):
    unmerge them first. A ``torch.compile`` model takes the names of the
    module it compiled, as :func:`lora_state_dict` gives them; a state whose
    every name carries the compiled wrapper's ``_orig_mod.`` prefix (saved
    from a compiled model by an older version) loads without it.
    """
    _check_model("load_lora_state_dict", model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_lora_state_dict: state_dict must be a mapping, got "
                        f"{type(state_dict).__name__}")
    odd = [key for key in state_dict if not isinstance(key, str)]
    if odd:
        raise TypeError(f"load_lora_state_dict: state_dict's keys must be parameter names "
                        f"(str), got {odd[0]!r} ({type(odd[0]).__name__})")
    model = compiled_original(model)
    adapters = _require_adapters("load_lora_state_dict", model)
    targets = adapter_parameters(adapters)
    prefix = "_orig_mod."
    while (state_dict and all(key.startswith(prefix) for key in state_dict)
           and not any(key.startswith(prefix) for key in targets)):
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    missing = [key for key in targets if key not in state_dict]
    unexpected = [key for key in state_dict if key not in targets]
    if missing or unexpected:
        raise ValueError(f"load_lora_state_dict: the keys differ from the model's adapters: "
                         f"missing {preview(missing)}; unexpected {preview(unexpected)}")
    for key, param in targets.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"load_lora_state_dict: {key} must be a tensor, got "
                            f"{type(value).__name__}")
        if not value.is_floating_point():
            # copy_ would round integers silently and drop a complex tensor's imaginary part.
            raise TypeError(f"load_lora_state_dict: {key} must be a floating-point tensor, got "
                            f"{dtype_name(value.dtype)}")
        if value.shape != param.shape:
            raise ValueError(f"load_lora_state_dict: {key} has shape {tuple(value.shape)}, "
                             f"the model's is {tuple(param.shape)}")
        if value.layout != torch.strided:
            raise TypeError(f"load_lora_state_dict: {key} must be a dense (strided) tensor, "
                            f"got layout {value.layout}")
        if value.is_meta and not param.is_meta:
            raise ValueError(f"load_lora_state_dict: {key} is on the meta device and holds no "
                             "values")
        if param.is_meta and not value.is_meta:
            # copy_ into a meta tensor keeps nothing.
            raise ValueError(f"load_lora_state_dict: the model's {key} is on the meta device, "
                             "where the values would be dropped; materialize the model first "
                             "(model.to_empty(device=...)), then load")
    merged = [name for name, lora in adapters.items() if lora.merged]
    if merged:
        raise ValueError(f"load_lora_state_dict: layer(s) {preview(merged)} are merged; "
                         "call unmerge() first")
    # Copied one after another: should a copy still fail (a device error, an
    # interrupt), the ones made are undone, so that nothing is loaded.
    kept = {key: param.detach().clone() for key, param in targets.items() if not param.is_meta}
    # Every value read before any is overwritten: one may be held in another
    # key's parameter (the model's own lora_state_dict with its keys swapped,
    # views of one flat buffer). Adapters are small; a DTensor has no storage
    # whose address could tell.
    sources = {key: state_dict[key] if state_dict[key].is_meta
               else state_dict[key].detach().clone() for key in targets}
    with torch.no_grad():
        try:
            for key, param in targets.items():
                param.copy_(sources[key])
        except BaseException:
            for key, value in kept.items():
                targets[key].copy_(value)
            raise


@keeps_encoder_flags
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base layer and put the base layer back, in place.

    An ``nn.Linear`` base takes ``scale·B·A`` into its weight; a
    ``LowRankLinear`` base takes the adapter into its factors, exactly, and
    its rank grows by the adapter's (see :meth:`LoRALinear.merge`).

    Layers already merged are just unwrapped. The base layers keep their
    ``requires_grad`` flags (frozen, as :func:`add_lora` left them). Returns
    the names of the layers unwrapped.

    Every refusal (a tied or shared base, a base whose weight is recomputed
    at every use, hooks that cannot combine) comes before anything changes.
    Should merging still fail midway (an interrupt), the layers merged so
    far are unmerged and put back: their weights then differ from the
    originals by the rounding of W + scale·B·A − scale·B·A.
    """
    _check_model("merge_lora", model, swaps_layers=True)
    adapters = _require_adapters("merge_lora", model)
    if "" in adapters:
        raise ValueError("merge_lora: the model is itself a LoRALinear; call its merge() "
                         "and use its .base")
    disabled = [name for name, lora in adapters.items() if not lora.adapter_enabled]
    if disabled:
        raise ValueError(f"merge_lora: the adapters of {preview(disabled)} are disabled (inside "
                         "lx.disable_lora), where the model gives its base's outputs alone, "
                         "which merged weights would no longer give; merge after the block")
    # Everything that can refuse is checked before the first merge: undoing a
    # merge (W + ΔW − ΔW) restores the weight only up to rounding.
    # An FSDP2 unit anywhere in the model may hold any layer's parameters.
    managed = fsdp_managed(model)
    refused = {name: FSDP_MERGE_WHY if managed else lora._cannot_merge()
               for name, lora in adapters.items() if not lora.merged}
    refused = {name: why for name, why in refused.items() if why}
    _refuse_merging(refused, "", lambda name, why: f"the base layer of {name} cannot take "
                    f"the adapter: {why}", "; keep the model unmerged (its LoRALinear layers "
                    "compute the same), or make those weights plain first")
    tied = weights_tied_elsewhere(model, {name: lora.base for name, lora in adapters.items()
                                          if not lora.merged})
    _refuse_merging(tied, "merging adds the adapter to the base weight, but ",
                    lambda name, others: f"the weight of {name} is tied to {', '.join(others)}",
                    ", which would change too; keep those adapters unmerged, or untie the "
                    "weight first (give the layer a copy of it)")
    places = places_of(model)
    # A base layer used somewhere else too (wrapped by hand where another
    # place calls it bare, or two adapters over one layer) would change there.
    shared = {}
    for name, lora in adapters.items():
        if not lora.merged:
            own = {f"{place}.base" for place in places[id(lora)]}
            others = [place for place in places.get(id(lora.base), []) if place not in own]
            if others:
                shared[name] = others
    _refuse_merging(shared, "merging adds the adapter to the base layer's weight, but ",
                    lambda name, others: f"the base layer of {name} is also at "
                    f"{', '.join(others)}", ", whose outputs would change too; give each "
                    "adapter a base layer of its own (a copy) before merging, or keep those "
                    "adapters unmerged")
    for name, lora in adapters.items():  # before anything changes
        for place in places[id(lora)]:
            check_backward_hooks_combine(place, lora, lora.base)
        try:  # a float16 weight past its range (each merged weight computed twice)
            lora._check_merge_fits()
        except ValueError as exc:
            raise ValueError(f"merge_lora: layer {name!r}: "
                             f"{str(exc).removeprefix('LoRALinear.merge: ')}; nothing was "
                             "merged") from None
    # Every warning before the first merge too: one turned into an error
    # midway would leave the merged weights off by that rounding.
    swaps = Swaps(model)
    for name, lora in adapters.items():
        if not lora.merged:
            lora._warn_of_merged_rank()
        for place in places[id(lora)]:
            swaps.warn_ahead(place, lora.base)
    for lora in adapters.values():  # none is tied now (see above): one untied since merges
        if not lora.merged:
            lora._weight_tied_to = ()
    merged_here = []
    try:
        for name, lora in adapters.items():
            if not lora.merged:
                lora._merge(warn=False)
                merged_here.append(lora)
            for place in places[id(lora)]:  # a shared adapter leaves every place it sits
                swaps.swap(place, lora.base, warn=False)
    except BaseException:  # a KeyboardInterrupt too: no model half unwrapped
        swaps.undo()
        for lora in merged_here:
            lora.unmerge()
        raise
    return list(adapters)


def _refuse_merging(problems, lead, describe, advice):
    """The ValueError of merge_lora for ``problems`` ({layer name: what}, the
    first three described), if there are any."""
    if problems:
        raise ValueError("merge_lora: " + lead
                         + "; ".join(describe(name, what)
                                     for name, what in list(problems.items())[:3]) + advice)


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``LoRALinear`` of ``model`` computes ``base(x)`` alone.

    peft's ``disable_adapter()``: the base model's outputs (a reference model
    for DPO or a KL penalty, say) without a second copy of its weights. The
    adapters come back on leaving the block, also after an exception; nothing
    is copied or modified. Merged layers are refused, since their base weight
    holds the adapter: unmerge them first. Blocks may nest. The modules that
    :func:`from_peft` took from peft's ``modules_to_save`` (a trained
    classifier head) give way to the originals peft kept, as in peft.
    Copying or pickling the model inside the block is refused (the copy would
    keep its adapters off for good, without the trained heads); a
    ``state_dict()`` taken inside holds the original heads' weights.
    """
    _check_model("disable_lora", model)
    root = compiled_original(model)
    adapters = _require_adapters("disable_lora", root)
    merged = [name or "(the model)" for name, lora in adapters.items() if lora.merged]
    if merged:
        raise ValueError(f"disable_lora: layer(s) {preview(merged)} are merged; call "
                         "unmerge() first")
    # The tensors the model holds follow the model already (a head tied to
    # the embedding holds the embedding's weight): the originals' own follow
    # their copies.
    held = {id(t) for t in itertools.chain(root.parameters(), root.buffers())}
    originals = []
    for name, module in root.named_modules():
        original = vars(module).get(ORIGINAL)
        if name and original is not None:
            place, _, child = name.rpartition(".")
            # A copy compiled on its own gives way together with its wrapper.
            originals.append((place if child == "_orig_mod" and place else name, module,
                              original))
    saved = {name: lora.adapter_enabled for name, lora in adapters.items()}
    swaps = Swaps(root)
    try:
        for lora in adapters.values():
            lora.adapter_enabled = False
        for name, copy, original in originals:
            _follow(original, copy, held)
            # Marked, so that save_peft_adapter does not write it for the copy.
            original.__dict__[STANDING_IN] = True
            swaps.swap(name, original, warn=False)
        yield model
    finally:
        try:
            try:
                swaps.put_back()
            except BaseException:  # as the swaps were made (an interrupt too)
                swaps.undo()
                raise
        finally:
            for _, _, original in originals:
                original.__dict__.pop(STANDING_IN, None)
            for name, lora in adapters.items():
                lora.adapter_enabled = saved[name]


# In the __dict__ of a module from_peft took from peft's modules_to_save: the
# original peft kept (outside the module tree), which disable_lora swaps in.
ORIGINAL = "_lowrank_ext_original"
# In the __dict__ of an original that stands in for its trained copy inside
# a disable_lora block.
STANDING_IN = "_lowrank_ext_standing_in"


def _follow(original, copy, held):
    """Give each tensor of ``original`` that the model does not hold the
    device and (floating) dtype of the same tensor of ``copy``, a deepcopy of
    it that may have been moved or cast since from_peft, and ``copy``'s
    training mode."""
    twins = dict(copy.named_modules())

    def first_floating(module):
        return next((t for t in itertools.chain(module.parameters(), module.buffers())
                     if t.is_floating_point()), None)

    # For a tensor the copy has no twin of (a parametrization added to the
    # copy since): the first floating tensor of the twin module (its
    # parametrizations included), else of the copy.
    anywhere = first_floating(copy)
    with torch.no_grad():
        for prefix, module in original.named_modules():
            twin = twins.get(prefix)
            nearby = first_floating(twin) if twin is not None else None
            nearby = anywhere if nearby is None else nearby
            for store in ("_parameters", "_buffers"):
                mine = getattr(module, store)
                theirs = getattr(twin, store) if twin is not None else {}
                for key, t in mine.items():
                    other = theirs.get(key)
                    other = nearby if other is None else other
                    if t is None or other is None or id(t) in held:
                        continue
                    dtype = other.dtype if t.is_floating_point() else t.dtype
                    if t.device != other.device or t.dtype != dtype:
                        moved = t.to(device=other.device, dtype=dtype)
                        if store == "_parameters":
                            t.data = moved
                        else:
                            mine[key] = moved
    original.train(copy.training)
