"""Save and load compressed models as safetensors, with the ranks as metadata.

The file holds the model's state_dict (``<layer>.A`` and ``<layer>.B`` for each
``LowRankLinear``) and, under the metadata key ``lowrank_ext``, a JSON object
``{"format": 1, "ranks": {layer name: rank}}``. Loading needs only the original
model's code: :func:`load_compressed` swaps the named ``nn.Linear`` (or
transformers ``Conv1D``) layers of a freshly built model for ``LowRankLinear``
of the stored ranks, then loads.

``B·A`` is the layer's weight in ``nn.Linear`` layout (out, in), as
``LowRankLinear`` holds it. Files from the ``compress`` command, which
factorizes tensors without knowing their layers, add ``"factors": "stored"``:
there ``B·A`` is the tensor as the input file stored it, which for a
transformers ``Conv1D`` (GPT-2) is the transpose, (in, out); loading turns
those factors around.
"""

from __future__ import annotations

import collections
import json
import os

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ._checks import check_device, dtype_name
from ._modules import (Swaps, compiled_original, dense_weight, is_conv1d, is_linear_layer,
                       refuse_distributed_wrapper, is_sharded, GATHER_FIRST,
                       keeps_encoder_flags, model_tensors, places_of)
from ._names import owner_prefix, preview
from .files import atomic_write, check_input_file, check_path
from .attention import split_where_stored_split
from .selection import left_alone_linears, not_standing_for
from .lora_layer import LoRALinear
from .nn import LowRankLinear, inherit_requires_grad

METADATA_KEY = "lowrank_ext"
FORMAT_VERSION = 1


_FACTOR_LAYOUTS = ("linear", "stored")


def ranks_metadata(ranks, factors="linear"):
    """The safetensors metadata entry recording ``{layer name: rank}``.

    ``factors="stored"``: each ``B·A`` is the tensor as an input file stored
    it, not necessarily in ``nn.Linear`` layout (see the module docstring).
    """
    assert factors in _FACTOR_LAYOUTS
    info = {"format": FORMAT_VERSION, "ranks": ranks}
    if factors != "linear":
        info["factors"] = factors
    return {METADATA_KEY: json.dumps(info, sort_keys=True)}


# safetensors' header may not exceed 100 MB.
_MAX_HEADER_BYTES = 100_000_000


def _why_unreadable(path):
    """Why safetensors cannot open ``path``: truncated or not safetensors at all; None if unsure."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            first = f.read(1)
            if size == 0:
                return "the file is empty"
            if size < 8:
                return (f"the file is only {size} bytes long: not a safetensors file, "
                        "or a truncated one")
            if first != b"{":
                return "it is not a safetensors file (no JSON header after the 8-byte length)"
            if length < 2 or length > _MAX_HEADER_BYTES:
                return f"it is not a safetensors file (header length {length} bytes)"
            if 8 + length > size:
                return (f"the file is truncated: its header is {length} bytes long but only "
                        f"{size - 8} bytes follow the length field")
            header = json.loads(first + f.read(length - 1))
        end = max((entry["data_offsets"][1] for key, entry in header.items()
                   if key != "__metadata__"), default=0)
        if 8 + length + end > size:
            return (f"the file is truncated: its tensors end at byte {8 + length + end} but "
                    f"the file has {size} bytes")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "it is not a safetensors file (its header is malformed)"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def unreadable_error(owner, path, exc):
    """The ValueError for a file that safetensors failed to open with ``exc``."""
    reason = _why_unreadable(path) or f"it is not a valid safetensors file ({exc})"
    return ValueError(f"{owner_prefix(owner)}cannot read {path} as safetensors: {reason}")


def save_compressed(model: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Write ``model``'s weights and its ``LowRankLinear`` ranks to ``path`` (safetensors).

    Returns ``{layer name: rank}`` (a layer registered under several names
    under each of them). A tensor that several names share is stored once,
    under the first name in sorted order, the others recorded as aliases of
    it in the metadata, as safetensors' ``save_model`` does; a tensor that
    is a view of part of another's memory (a slice, a transpose) is stored
    as a copy of its own. The file is written beside ``path`` and renamed
    onto it (a symbolic link there is replaced, its target kept), so that a
    failure never leaves a half-written file. A model holding LoRA adapters is
    refused: :func:`load_compressed` rebuilds a model's compressed layers, not
    its adapters. Fold them in with :func:`merge_lora` first, or save the
    model before :func:`add_lora` and the adapters alone with
    :func:`lora_state_dict` (or :func:`save_peft_adapter`). So is a
    ``LowRankLinear`` with a parametrization (``torch.nn.utils.parametrize``),
    whose factors the file would hold under other names. A ``torch.compile``
    model is saved as the module it compiled, under that module's names.
    """
    from safetensors.torch import save_file
    from torch.nn.utils import parametrize

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_compressed: model must be an nn.Module, got {type(model).__name__}")
    path = check_path("save_compressed", path)
    model = compiled_original(model)
    adapted = [name or "(the model)" for name, m in model.named_modules()
               if isinstance(m, LoRALinear)]
    if adapted:
        raise ValueError(
            f"save_compressed: the model holds LoRA adapters ({preview(adapted)}), which "
            "load_compressed cannot rebuild; fold them in with lx.merge_lora(model) first, "
            "or save the model from before add_lora and the adapters with "
            "lx.lora_state_dict(model)")
    parametrized = [f"{name or '(the model)'} (on {', '.join(m.parametrizations)})"
                    for name, m in model.named_modules()
                    if isinstance(m, LowRankLinear) and parametrize.is_parametrized(m)]
    if parametrized:
        # Their tensors go in as "<layer>.parametrizations.A.original", which
        # the plain LowRankLinear load_compressed builds does not hold.
        raise ValueError(
            "save_compressed: the model has LowRankLinear layers with parametrizations "
            f"(torch.nn.utils.parametrize): {preview(parametrized)}; load_compressed cannot "
            "rebuild them. Remove them first with parametrize.remove_parametrizations(layer, "
            "name), which keeps the parametrized values")
    # torch's hook-based weight_norm and pruning store a factor as A_g/A_v or
    # B_orig/B_mask, which the plain layers load_compressed builds do not hold.
    odd = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            held = set(m.state_dict(keep_vars=True))
            if held - {"A", "B", "bias"} or not {"A", "B"} <= held:
                odd[name or "(the model)"] = sorted(held - {"A", "B", "bias"})
    if odd:
        raise ValueError(
            "save_compressed: LowRankLinear layer(s) "
            + "; ".join(f"{name} (holding {', '.join(keys) or 'no A or B'})"
                        for name, keys in list(odd.items())[:3])
            + " store other tensors than A, B and bias (torch's weight_norm or pruning "
            "hooks?), which load_compressed cannot rebuild; remove them first "
            "(torch.nn.utils.remove_weight_norm, torch.nn.utils.prune.remove)")
    ranks = {name: m.rank for name, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, LowRankLinear)}
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"save_compressed: model.state_dict() holds {key}, a "
                            f"{type(value).__name__} (a module's extra state?); a safetensors "
                            "file holds tensors only")
        if is_sharded(value):
            raise ValueError(f"save_compressed: {key} is {GATHER_FIRST}")
        if value.layout != torch.strided:
            raise TypeError(f"save_compressed: {key} is a {value.layout} tensor; a safetensors "
                            "file holds dense tensors only (convert it with .to_dense())")
        if value.is_meta:
            raise ValueError(f"save_compressed: {key} is on the meta device and holds no "
                             "values; materialize the model and load its weights first")
    tensors, aliases = _tensors_to_store(state)
    metadata = {**aliases, **ranks_metadata(ranks)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata),
                 owner="save_compressed")
    return ranks


def _tensors_to_store(state):
    """``(tensors, {alias: stored name})`` for a state_dict, as safetensors
    takes them: one tensor per set of names that are the same view of the
    same memory (a tie), stored under the first of them in sorted order (as
    ``save_model`` picks it, so that files agree on the names); contiguous;
    and none sharing memory with another (safetensors' ``save_model`` takes
    any tensors whose memory overlaps for one tensor under several names,
    which loses a slice of a larger tensor, or fails)."""
    views = {}
    for name, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":
            views[name] = [name]
            continue
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tensor.stride(), tensor.dtype)
        views.setdefault(view, []).append(name)
    tensors, aliases = {}, {}
    for names in views.values():
        kept = min(names)
        tensors[kept] = state[kept]
        aliases.update((name, kept) for name in names if name != kept)
    return separate_memory(tensors), aliases


def separate_memory(tensors):
    """``tensors`` ({name: tensor}) as safetensors' ``save_file`` takes them:
    contiguous, and none sharing memory with another (each of those gets a
    copy of its own, written whole)."""
    def memory(t):
        return t.untyped_storage().data_ptr() if t.numel() and t.device.type != "meta" else None

    shared = collections.Counter(memory(t) for t in tensors.values())
    return {name: t.contiguous() if not t.is_contiguous()
            else t.clone() if memory(t) is not None and shared[memory(t)] > 1 else t
            for name, t in tensors.items()}


def _shards(index, owner):
    """The files a safetensors index (``model.safetensors.index.json``) lists, beside it.

    Each must hold exactly the keys the index's ``weight_map`` puts in it:
    readers take every key of every shard, so a key also in another shard (a
    stale copy) would silently replace the one the map names, whichever shard
    came last.
    """
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        names = set(weight_map.values())
        if not names or not all(isinstance(name, str) for name in names):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{owner_prefix(owner)}{index} is not a safetensors index (a JSON "
                         "object with a non-empty 'weight_map')") from None
    # Normalized, so that "s.safetensors" and "./s.safetensors" are one shard.
    shard_of = {key: os.path.normpath(os.path.join(os.path.dirname(index), name))
                for key, name in weight_map.items()}
    paths = sorted(set(shard_of.values()))
    for shard in paths:
        check_input_file(owner, shard)
    for shard, f in opened(paths, owner):
        held = set(f.keys())
        mapped = {key for key, where in shard_of.items() if where == shard}
        stray = sorted(held - mapped)
        if stray:
            raise ValueError(f"{owner_prefix(owner)}{shard} holds {preview(stray)}, which the "
                             f"weight_map of {index} does not put in that shard")
        missing = sorted(mapped - held)
        if missing:
            raise ValueError(f"{owner_prefix(owner)}{shard} lacks {preview(missing)}, which the "
                             f"weight_map of {index} puts in that shard")
    return paths


def model_files(path, owner="load_compressed"):
    """The safetensors files holding the model at ``path``.

    A file; an index ``*.index.json`` (its shards); or a directory, as
    transformers' ``save_pretrained`` writes it: ``model.safetensors``, or the
    shards ``model.safetensors.index.json`` lists.
    """
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return _shards(candidate, owner) if name.endswith(".json") else [candidate]
        raise FileNotFoundError(f"{owner_prefix(owner)}{path} is a directory with neither "
                                "model.safetensors nor model.safetensors.index.json")
    check_input_file(owner, path)
    return _shards(path, owner) if path.endswith(".index.json") else [path]


def opened(files, owner):
    """Yield ``(path, safe_open handle)`` for each file, closing each after use.

    A file safetensors cannot open is a ValueError naming it and why (see
    :func:`unreadable_error`).
    """
    from safetensors import safe_open

    for path in files:
        try:
            handle = safe_open(path, framework="pt")
        except Exception as exc:  # safetensors raises its own error type for a bad file
            raise unreadable_error(owner, path, exc) from exc
        with handle:
            yield path, handle


def read_tensor(handle, path, key, owner):
    """``handle.get_tensor(key)``; a tensor safetensors cannot give to torch (a
    dtype torch has no type for, such as F6_E2M3) is a ValueError naming it."""
    try:
        return handle.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error type
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{owner_prefix(owner)}cannot read tensor {key!r} of {path}: {exc}") \
            from exc


def safetensors_device(device):
    """``device`` as safetensors takes it: "cpu" for every CPU device (it
    refuses "cpu:0")."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


def stored_aliases(metadata, keys):
    """{alias: stored key}: save_model stores a tensor that several names share
    once, under one of them, and maps the other names to it in the metadata."""
    return {alias: key for alias, key in metadata.items() if key in keys and alias not in keys}


def read_headers(files):
    """(metadata of each file, {key: shape} over all files, {alias: stored key})."""
    metadatas, shapes = [], {}
    for _, f in opened(files, "load_compressed"):
        metadatas.append(dict(f.metadata() or {}))
        shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    aliases = {}
    for metadata in metadatas:
        aliases.update(stored_aliases(metadata, shapes))
    return metadatas, shapes, aliases


def _parse_ranks(path, entry, owner="load_compressed"):
    """``({layer name: rank}, factor layout)`` from a file's metadata entry."""
    def malformed(why):
        return ValueError(f"{owner_prefix(owner)}{path} has malformed {METADATA_KEY!r} metadata: "
                          f"{why}")

    try:
        info = json.loads(entry)
    except ValueError as exc:
        raise malformed(f"it is not JSON ({exc})") from None
    if not isinstance(info, dict):
        raise malformed(f"a JSON object was expected, got {entry[:60]!r}")
    # JSON integers only, here and in the ranks: True == 1 == 1.0 in Python,
    # and int() would take 7.9, true or "7".
    version = info.get("format")
    if type(version) is not int:
        raise malformed(f"'format' must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"{owner_prefix(owner)}{path} is in format version {version} of "
                         f"lowrank_ext files; this version reads format {FORMAT_VERSION}")
    ranks = info.get("ranks")
    if not isinstance(ranks, dict):
        raise malformed(f"'ranks' must be an object of layer name: rank, got "
                        f"{json.dumps(ranks)[:60]}")
    factors = info.get("factors", "linear")
    if factors not in _FACTOR_LAYOUTS:
        raise malformed(f"'factors' must be one of {', '.join(map(repr, _FACTOR_LAYOUTS))}, "
                        f"got {factors!r}")
    wrong = [f"{name!r}: {json.dumps(rank)[:20]}" for name, rank in ranks.items()
             if type(rank) is not int]
    if wrong:
        raise malformed(f"ranks must be integers, got {preview(wrong)}")
    return dict(ranks), factors


def ranks_in_metadata(path, files, metadatas, owner="load_compressed"):
    """``({layer name: rank}, factor layout)`` over the files' metadata; the
    layout is None where no file has any. Files that disagree on it are a
    ValueError."""
    ranks, layouts = {}, set()
    for file, metadata in zip(files, metadatas):
        if METADATA_KEY in metadata:
            found, factors = _parse_ranks(file, metadata[METADATA_KEY], owner)
            ranks.update(found)
            layouts.add(factors)
    if len(layouts) > 1:
        raise ValueError(f"{owner_prefix(owner)}the files of {path} disagree on the layout of "
                         "their factors")
    return ranks, layouts.pop() if layouts else None


def factor_pairs(shapes):
    """``{layer name: rank}`` from the ``<layer>.A`` (r, in) and ``<layer>.B``
    (out, r) pairs among ``shapes`` ({key: shape}), as a compressed model's
    state_dict holds them, leaving out any layer that stores other tensors
    besides its bias (a LoRALinear's ``base.weight``): those are not
    LowRankLinear layers."""
    # Module names holding some tensor other than their own A, B and bias.
    holds_more = set()
    for key in shapes:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) not in ("A", "B", "bias"):
                holds_more.add(".".join(parts[:i]))
    ranks = {}
    for key, a in shapes.items():
        name = key[:-2]
        b = shapes.get(f"{name}.B")
        if (key.endswith(".A") and b is not None and name not in holds_more
                and len(a) == 2 and len(b) == 2 and a[0] == b[1] >= 1):
            ranks[name] = a[0]
    return ranks


def read_ranks(path, files, metadatas, shapes):
    """``({layer name: rank}, factor layout, whether the ranks were inferred)``.

    From the metadata that :func:`save_compressed` and the ``compress``
    command write; for files without it (a compressed model's state_dict
    written by transformers' ``save_pretrained`` or ``safetensors``), from the
    ``<layer>.A`` and ``<layer>.B`` pairs themselves (:func:`factor_pairs`).
    """
    ranks, layout = ranks_in_metadata(path, files, metadatas)
    if layout is not None:
        return ranks, layout, False
    ranks = factor_pairs(shapes)
    if not ranks:
        raise ValueError(
            f"load_compressed: {path} has no {METADATA_KEY!r} metadata and no "
            "'<layer>.A' / '<layer>.B' factors; it holds no compressed model (write one with "
            "save_compressed, save_pretrained of a compressed model, or the compress command)")
    return ranks, "linear", True


@keeps_encoder_flags
def load_compressed(model: nn.Module, path: str | os.PathLike, *,
                    strict: bool = True,
                    device: str | torch.device | None = None) -> nn.Module:
    """Load a compressed model's weights into a freshly built original ``model``.

    ``path``: a file from :func:`save_compressed` or the ``compress``
    command; a safetensors file of a compressed model's state_dict; or a
    directory written by transformers' ``save_pretrained`` (one
    ``model.safetensors`` or the shards of ``model.safetensors.index.json``,
    also given directly). Each ``nn.Linear`` named in the metadata (without
    it, each layer the file holds ``<layer>.A`` and ``<layer>.B`` for) is
    replaced (in place) by a ``LowRankLinear`` of that rank on the layer's
    device and dtype, then all weights are loaded. A layer there that
    compress_model leaves alone (a subclass, a forward set on the instance,
    parameters, buffers or submodules besides its weight and bias, which the
    swap would lose) is a ``ValueError`` naming it. A model tensor tied to
    another that the file stores (an output head sharing its embedding
    table) takes that tensor's value. ``nn.MultiheadAttention`` modules that
    the file holds with split projections (:func:`split_attention` before
    compressing) are split first. The hooks registered on a replaced module
    move to the module replacing it. A ``torch.compile`` model loads into the
    module it compiled (whose names :func:`save_compressed` writes; a file of
    a compiled model's own ``state_dict()``, every name prefixed
    ``_orig_mod.``, loads into the compiled model as it is). If anything
    fails (a KeyboardInterrupt too) the model is put back as it was: the
    values the file would overwrite in tensors the model already holds on a
    real device are copied to host memory first (none for a model built on
    meta). Returns ``model``.

    ``strict=False`` tolerates tensors missing from the file (the model keeps
    its own values, a replaced layer its original bias) or extra ones, but the
    ``A`` and ``B`` of every layer the metadata names must be in the file.

    The model may be built on the ``meta`` device (``with torch.device("meta"):``
    or parameters only, as ``accelerate.init_empty_weights()`` does), so that
    the dense weights the file replaces are never allocated: each meta
    parameter or buffer is created on ``device`` (default: the device of the
    model's other tensors, else the CPU) in its own dtype, tied tensors stay
    tied, and the file fills it. Every meta tensor must then come from the
    file; one that cannot (a non-persistent buffer, or one the file lacks
    under ``strict=False``) is a ``ValueError`` naming it, raised before
    anything is loaded. ``device`` does not move tensors that are already on
    a real device. A transformers model on meta gets its declared ties
    (``tie_weights()``) first, as ``from_pretrained`` would.

    Bad files raise ``ValueError`` naming the file and what is wrong with it
    (not safetensors, truncated, no or malformed metadata); a model that does
    not fit raises ``ValueError`` / ``RuntimeError`` naming the layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_compressed: model must be an nn.Module, got {type(model).__name__}")
    refuse_distributed_wrapper(model, "load_compressed")
    path = check_path("load_compressed", path)
    device = check_device("load_compressed", device,
                          "holds no data; give the device the file's tensors should go to")
    files = model_files(path)
    metadatas, shapes, aliases = read_headers(files)
    ranks, factors, inferred = read_ranks(path, files, metadatas, shapes)
    given, model = model, _module_named_as_in(model, path, shapes)
    if not torch.is_inference_mode_enabled():
        # Loading writes into them, which torch refuses outside inference
        # mode only once part of the model has been swapped.
        made_inside = [name for name, t in model.state_dict(keep_vars=True).items()
                       if not is_lazy(t) and t.is_inference()]
        if made_inside:
            raise RuntimeError(
                f"load_compressed: the model's tensors {preview(made_inside)} are inference "
                "tensors (made under torch.inference_mode()), which can only be written "
                "inside inference mode; build the model outside inference mode, or load "
                "inside it")
    # Each change to the model puts what takes it back on ``undo`` before it
    # is made; should anything fail (an interrupt too), they all run here,
    # last first, so that no part of the load stays done without the rest.
    split = Swaps(model)
    undo = [split.undo]
    try:
        # Attention modules the file holds split (lx.split_attention) are split here too.
        # Aliases too: a module under several names has its tensors stored
        # under the first in sorted order, which need not be its first name.
        split_where_stored_split(model, {*shapes, *aliases}, split)
        _load_into(model, path, strict, device, files, shapes, aliases, ranks, factors,
                   inferred, undo)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    return given


def _module_named_as_in(model, path, shapes):
    """The module whose names the file's keys are: for a ``torch.compile``
    model, the module it compiled, as save_compressed saves that one; the
    model itself for a file holding a compiled model's ``state_dict()``,
    whose every key has the wrapper's ``_orig_mod.`` prefix (a ValueError
    where the model has no such submodule)."""
    prefix = "_orig_mod."
    if not (shapes and all(key.startswith(prefix) for key in shapes)):
        return compiled_original(model)
    if not isinstance(getattr(model, prefix[:-1], None), nn.Module):
        raise ValueError(
            f"load_compressed: every tensor name in {path} starts with {prefix!r}: it holds "
            "the state of a torch.compile model under the compiled wrapper's names; load it "
            "into torch.compile(model), whose names those are, or save the model with "
            "lx.save_compressed, which saves the module torch.compile wrapped")
    return model


def _load_into(model, path, strict, device, files, shapes, aliases, ranks, factors, inferred,
               undo):
    # Every name of a module registered under several (one layer used twice).
    modules = dict(model.named_modules(remove_duplicate=False))
    if inferred:
        # Another kind of module may own parameters called A and B; the pairs
        # name compressed layers only where the model has a layer to swap.
        ranks = {name: rank for name, rank in ranks.items()
                 if name not in modules or is_linear_layer(modules[name])
                 or isinstance(modules[name], LowRankLinear)}
        if not ranks:
            raise ValueError(
                f"load_compressed: {path} has no {METADATA_KEY!r} metadata and no "
                "'<layer>.A' / '<layer>.B' factors of the model's Linear layers; it holds no "
                "compressed model of it")
    else:
        # Factors the metadata gives no rank would leave the layer dense with
        # the values it was built with, strict or not.
        ranked = {id(modules[name]) for name in ranks if name in modules}
        unranked = [name for name in factor_pairs(shapes)
                    if id(modules.get(name)) not in ranked and is_linear_layer(modules.get(name))]
        if unranked:
            raise ValueError(
                f"load_compressed: {path} holds the factors of {preview(unranked)} (<layer>.A "
                f"and <layer>.B), Linear layers of the model, but its {METADATA_KEY!r} metadata "
                "gives them no rank: the metadata does not describe the file's tensors")
    swaps, made = {}, {}
    for name, rank in ranks.items():
        layer = modules.get(name)
        if isinstance(layer, LowRankLinear) and layer.rank == rank:
            continue  # already in compressed form
        if id(layer) in made:  # a layer the file names under several of its names
            if made[id(layer)].rank != rank:
                raise ValueError(
                    f"load_compressed: {path} gives layer {name!r} rank {rank} and another "
                    f"name of the same layer rank {made[id(layer)].rank}")
            swaps[name] = made[id(layer)]
            continue
        if not name and is_linear_layer(layer):
            # replace_module swaps a child of its parent; the root has none.
            d, k = dense_weight(layer).shape
            kind = "an nn.Linear" if type(layer) is nn.Linear else f"a {type(layer).__name__}"
            raise TypeError(
                f"load_compressed: {path} holds a bare LowRankLinear of rank {rank} (saved "
                f"from the layer itself), and the model is itself {kind}, which cannot "
                f"replace itself in place; load into lx.LowRankLinear({k}, {d}, {rank}"
                f"{'' if 'bias' in shapes else ', bias=False'}) instead")
        if not is_linear_layer(layer):
            found = "nothing" if layer is None else type(layer).__name__
            if layer is None and "module" not in modules and all(
                    other.startswith("module.") for other in ranks):
                raise ValueError(
                    f"load_compressed: every layer {path} stores is named 'module.…', as "
                    "a DataParallel or DistributedDataParallel wrapper names them, and the "
                    "model has no 'module'; save the model it wraps (its .module) instead, "
                    "load that, and wrap the model after loading")
            if layer is None and "module" in modules and all(
                    f"module.{other}" in modules for other in ranks):
                raise ValueError(
                    f"load_compressed: {path} stores layer {name!r}, which the model has as "
                    f"'module.{name}': it wraps the model the file was saved from (as "
                    "DataParallel or DistributedDataParallel do); load into its .module")
            if inferred and layer is None and name.endswith(".base") \
                    and f"{name[:-len('.base')]}.A" in shapes:
                raise ValueError(
                    f"load_compressed: {path} holds a LoRA adapter over a compressed layer "
                    f"({name[:-len('.base')]!r}: its .A/.B beside .base.A/.base.B), which "
                    "load_compressed does not rebuild; save the model before lx.add_lora, or "
                    "after lx.merge_lora, and the adapters with lx.lora_state_dict(model)")
            if inferred and layer is None:
                raise ValueError(
                    f"load_compressed: {path} holds factors of a layer {name!r}, but the model "
                    "has nothing there: the file names its tensors otherwise than the model "
                    "(transformers' save_pretrained renames the keys of some models); write "
                    "the file with lx.save_compressed, which keeps the model's own names")
            if isinstance(layer, nn.Linear) and is_lazy(layer.weight):
                raise ValueError(
                    f"load_compressed: {path} stores layer {name!r} at rank {rank}, but the "
                    f"model has an uninitialized {found} there, whose shape is not known "
                    "until its first forward; run the model once (or give in_features) first")
            if isinstance(layer, nn.Linear):
                # Why compress_model leaves it alone (a parametrization, an
                # owner reading its weight, ...), as its report says.
                _, why = left_alone_linears(model).get(name, (None, None))
                raise ValueError(
                    f"load_compressed: {path} stores layer {name!r} at rank {rank}, but the "
                    f"model has there "
                    + (why or f"{found}, a subclass of nn.Linear whose forward or owner may use "
                       "the weight otherwise than nn.Linear does")
                    + "; compress_model never compresses such a layer")
            raise ValueError(
                f"load_compressed: {path} stores layer {name!r} at rank {rank}, but the model "
                f"has {found} there; build the original (uncompressed) model first")
        why = not_standing_for(layer)
        if why is not None:
            # Swapped, it would lose that forward or those tensors, and a
            # strict load would not notice: it checks the swapped model.
            raise ValueError(
                f"load_compressed: {path} stores layer {name!r} at rank {rank}, but the model "
                f"has there {why}; compress_model never compresses such a layer")
        weight = layer.weight
        out_features, in_features = dense_weight(layer).shape
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"load_compressed: rank {rank} stored for layer {name!r} does not fit its shape "
                f"{[out_features, in_features]} (in {path})")
        # Outside inference mode: a layer made under torch.inference_mode()
        # would hold inference tensors, which the model could never train.
        with torch.inference_mode(False):
            new = LowRankLinear(in_features, out_features, rank, bias=layer.bias is not None,
                                device=weight.device, dtype=weight.dtype)
            if layer.bias is not None:
                # strict=False keeps the model's bias where the file has none.
                with torch.no_grad():
                    new.bias.copy_(layer.bias)
        swaps[name] = made[id(layer)] = inherit_requires_grad(new, layer)
    # A layer registered under several names is replaced in each place by the
    # one new layer, as the saved model held it (a file written before its
    # metadata named every place names one).
    places = places_of(model)
    for name, new in list(swaps.items()):
        for place in places[id(modules[name])]:
            swaps.setdefault(place, new)
    # Factors of a Conv1D's stored (in, out) tensor: A (r, out), B (in, r).
    turned = {name for name in swaps if factors == "stored" and is_conv1d(modules[name])}
    _tie_declared_weights(model, undo)
    # Should the load fail, the tensors the model holds now on a real device
    # get their values back; those made here (in the layers swapped in, or
    # for meta tensors) leave the model.
    own = {id(t): t for *_, t in model_tensors(model) if not t.is_meta}
    swapped = Swaps(model)
    undo.append(swapped.undo)
    for name, new in swaps.items():
        new.train(swapped.swap(name, new).training)
    # Check names and shapes before any tensor is copied, so that a file
    # that does not fit leaves the model as it was.
    sources = _check_fits(model, path, shapes, aliases, strict, swaps, turned)
    device = _load_device(model, device)
    _check_meta_tensors_come_from_file(model, path, sources)
    _materialize_meta_tensors(model, device, sources, undo)
    _keep_overwritten_values(model, sources, own, undo)
    _copy_from_files(model, path, files, device, sources, turned)
    return model


def _keep_overwritten_values(model, sources, own, undo):
    """Copy the value of each tensor of ``own`` ({id: tensor}) that the files
    fill (a key of ``sources``); put on ``undo`` what copies them back.

    load_state_dict copies into the model's tensors one after another, in
    place: a failure halfway would leave some holding the file's values. It
    keeps the tensors themselves (an optimizer may hold them), and so does
    putting their values back. Only the tensors it overwrites are copied,
    once however many names a tie gives them, and into host memory: a model
    that fills most of its accelerator would not load if its copies took
    room there too.
    """
    saved = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in sources and id(tensor) in own and id(tensor) not in saved:
            saved[id(tensor)] = (tensor, tensor.detach().to("cpu", copy=True))

    def copy_back():
        with torch.no_grad():
            for tensor, value in saved.values():
                tensor.copy_(value)
    undo.append(copy_back)


def _tie_declared_weights(model, undo):
    """Tie what a transformers model declares tied, if it is built on meta;
    put on ``undo`` what unties them.

    transformers ties an output head to its embedding table when it loads a
    checkpoint, and its save_pretrained writes the table under one name
    only; a model built with empty (meta) weights may not be tied yet, and
    the head would have no value.
    """
    tie = getattr(model, "tie_weights", None)
    if not callable(tie) or not any(t.is_meta for *_, t in model_tensors(model)):
        return
    before = [(module, dict(module._parameters)) for module in model.modules()]

    def untie():
        for module, parameters in before:
            module._parameters.update(parameters)
    undo.append(untie)
    tie()


def _load_device(model, device):
    """Where meta tensors are created: ``device``, else the model's first real device, else CPU."""
    if device is not None:
        return device
    for *_, tensor in model_tensors(model):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _turn_factors(values, names):
    """For each layer in ``names``, A, B = Bᵀ, Aᵀ: factors of Wᵀ from those of W."""
    for name in names:
        if f"{name}.A" not in values or f"{name}.B" not in values:
            continue  # stored under another name; the shape check names it
        a, b = values[f"{name}.A"], values[f"{name}.B"]
        values[f"{name}.A"], values[f"{name}.B"] = _transpose(b), _transpose(a)


def _transpose(value):
    return tuple(reversed(value)) if isinstance(value, tuple) else value.T.contiguous()


def _copy_from_files(model, path, files, device, sources, turned):
    """Copy every tensor the files hold for ``model`` into it (names already checked).

    ``sources`` maps each model key the files can fill to the key it is
    stored under: itself, or for a name the saved model tied to another (an
    alias in the metadata, or a tie the model itself has) that other key.
    """
    from safetensors import safe_open

    expected = model.state_dict(keep_vars=True)
    # Not the file's other tensors (strict=False leaves them): neither their
    # memory nor a dtype torch cannot hold stops the load.
    state, needed = {}, {stored for key, stored in sources.items() if key in expected}
    for file in files:
        try:
            handle = safe_open(file, framework="pt", device=safetensors_device(device))
        except Exception as exc:  # safetensors' own error: a device it does not know
            if type(exc).__name__ != "SafetensorError":
                raise
            raise ValueError(f"load_compressed: cannot read {file} onto device "
                             f"{str(device)!r}: {exc}") from exc
        with handle as f:
            state.update({key: read_tensor(f, file, key, "load_compressed")
                          for key in f.keys() if key in needed})
    state = {key: state[stored] for key, stored in sources.items() if stored in state}
    _turn_factors(state, turned)
    _check_kinds_agree(path, expected, state, sources)
    _check_ties_agree(path, expected, state, sources)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _tied_keys(expected):
    """The model's state-dict keys grouped by the tensor they name (a tie: one
    tensor under several keys; every other key alone)."""
    groups = {}
    for key, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(key)
    return groups.values()


def _dtype_kind(dtype):
    return ("complex" if dtype.is_complex else "floating-point" if dtype.is_floating_point
            else "integer or bool")


def _check_kinds_agree(path, expected, state, sources):
    """A TypeError, before anything is copied, where a file's tensor is of
    another kind than the model's (floating point, complex, integer or bool):
    load_state_dict would cast it silently, rounding integers' fractions or
    dropping a complex tensor's imaginary part. Float widths may differ (a
    bfloat16 file into a float32 model), as in load_state_dict."""
    wrong = [f"{key} is {dtype_name(state[key].dtype)} in the file"
             + ("" if sources[key] == key else f" (stored as {sources[key]})")
             + f" but {dtype_name(expected[key].dtype)} in the model"
             for key in state if key in expected
             and _dtype_kind(state[key].dtype) != _dtype_kind(expected[key].dtype)]
    if wrong:
        raise TypeError(f"load_compressed: {path} holds tensors of another kind than the "
                        f"model's: {'; '.join(wrong[:5])}")


def _check_ties_agree(path, expected, state, sources):
    """A RuntimeError, before anything is copied, where the model holds one
    tensor under names the file stores with different values.

    The model ties them (an output head sharing its embedding table), the
    saved model did not: loading both into one tensor would keep whichever
    came last and silently change the other layer.
    """
    for keys in _tied_keys(expected):
        keys = [key for key in keys if key in state]
        if not keys:
            continue
        first = state[keys[0]]
        for key in keys[1:]:
            if sources[key] != sources[keys[0]] and not torch.equal(state[key], first):
                raise RuntimeError(
                    f"load_compressed: the model ties {keys[0]} and {key} (one tensor), but "
                    f"{path} stores different values for them: it comes from a model without "
                    "that tie; build the model untied, as the saved one was")


def _check_meta_tensors_come_from_file(model, path, sources):
    """A ValueError, before any change, for a meta tensor the file cannot fill.

    A materialized tensor starts uninitialized; only the file's value may
    replace that, or the model would compute with whatever memory held.
    """
    persistent = set(model.state_dict(keep_vars=True))
    unfilled = [name for *_, name, tensor in model_tensors(model)
                if tensor.is_meta and (name not in persistent or name not in sources)]
    if unfilled:
        raise ValueError(
            f"load_compressed: the model has tensors on the meta device that {path} does not "
            f"hold, so they would stay uninitialized: {preview(unfilled)}. Build those on a real device "
            "(e.g. put only parameters on meta, as accelerate.init_empty_weights() does; "
            "non-persistent buffers are never in a saved file)")


def _set_tensor(module, attr, tensor):
    if attr in module._parameters:
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor


def _materialize_meta_tensors(model, device, sources, undo):
    """Give every meta parameter and buffer uninitialized storage on ``device``;
    put on ``undo`` what puts the meta tensors back.

    A tensor that several modules share gets one new tensor, so ties
    (e.g. an embedding and its output head) survive. So do ties the model
    never made on meta but the file records (transformers ties its weights
    after loading; on meta they are separate): names stored as one tensor
    become one parameter again when their shapes and dtypes agree.
    """
    replacements = {}
    changed = []  # (module, attribute, meta tensor)

    def put_back():
        for module, attr, meta in changed:
            _set_tensor(module, attr, meta)
    undo.append(put_back)
    for module, attr, name, tensor in model_tensors(model):
        if not tensor.is_meta:
            continue
        stored_as = (sources[name], tensor.shape, tensor.dtype, type(tensor),
                     tensor.requires_grad)
        new = replacements.get(id(tensor))
        if new is None:
            new = replacements.get(stored_as)
        if new is None:
            with torch.inference_mode(False):  # as for the new layers in _load_into
                new = torch.empty_like(tensor, device=device)
                if isinstance(tensor, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            replacements[stored_as] = new
        replacements[id(tensor)] = new
        changed.append((module, attr, tensor))
        _set_tensor(module, attr, new)


def _check_fits(model, path, stored, aliases, strict, swapped, turned):
    """Check names and shapes; return {model key: the stored key that fills it}."""
    expected = model.state_dict(keep_vars=True)
    # A layer just swapped in has random factors: they must come from the
    # file, strict or not, under one of its names at least (a layer the model
    # also holds under a name the file does not know is one layer; its names
    # are listed from the one the metadata gave, see _load_into).
    names_of = {}
    for name, layer in swapped.items():
        names_of.setdefault(id(layer), (layer, []))[1].append(name)
    for layer, names in names_of.values():
        missing = [[key for key in (f"{name}.A", f"{name}.B")
                    if key not in stored and key not in aliases] for name in names]
        if all(missing):
            raise ValueError(
                f"load_compressed: {path} gives layer {names[0]!r} rank {layer.rank} in its "
                f"metadata but has no tensor {missing[0][0]!r}")
    stored = dict(stored)
    _turn_factors(stored, turned)
    sources = {key: key for key in stored}
    sources.update({alias: key for alias, key in aliases.items() if alias not in sources})
    # transformers' save_pretrained drops a tied tensor's other names (an
    # output head sharing the embedding table): a model key whose tensor is
    # another key's takes that key's value.
    for keys in _tied_keys(expected):
        stored_key = next((sources[k] for k in keys if k in sources), None)
        if stored_key is not None:
            for key in keys:
                sources.setdefault(key, stored_key)
    # Every model key the file fills, also through an alias or a tie: a
    # mismatch found only while copying would leave the model half loaded.
    problems = [f"{key} has shape {list(stored[source])} in the file"
                + ("" if source == key else f" (stored as {source})")
                + f" but {list(expected[key].shape)} in the model"
                for key, source in sources.items()
                if key in expected and source in stored
                and tuple(expected[key].shape) != tuple(stored[source])]
    if strict:
        missing = [k for k in expected if k not in sources]
        unexpected = [k for k in stored if k not in expected]
        if missing:
            problems.append(f"missing from the file: {', '.join(missing[:5])}")
        if unexpected:
            problems.append(f"not in the model: {', '.join(unexpected[:5])}")
    if problems:
        raise RuntimeError(f"load_compressed: {path} does not fit the model: "
                           f"{'; '.join(problems)}")
    return sources
