"""Replacing a named submodule in place (its hooks moving to the new module,
and torch's Transformer encoder modules kept off the fused paths that would
bypass it), undoing such replacements when a change fails, and the layer
kinds compression replaces."""

import contextlib
import functools
import importlib
import os
import sys
import warnings

import torch
from torch import nn

from ._checks import holds_values


def replace_module(model, name, new):
    """Put ``new`` in place of the submodule called ``name``; return the module it replaced.

    The hooks registered on the old module move to ``new`` (see :func:`move_hooks`).
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if id(old) in compiled_alone(parent):
        # The callers leave these alone first (compiled_alone); this is the last guard.
        raise RuntimeError(f"cannot replace {name}: {COMPILED_ALONE_WHY}")
    check_backward_hooks_combine(name, old, new)
    setattr(parent, child, new)
    move_hooks(old, new)
    if type(new) is not nn.Linear:
        keep_off_fused_encoder_paths(model, parent_name, new)
    return old


class Swaps:
    """:func:`replace_module` on one model, each swap remembered so that
    :meth:`undo` can take them all back::

        swaps = Swaps(model)
        try:
            for name, new in replacements.items():
                swaps.swap(name, new)
        except BaseException:  # a KeyboardInterrupt too
            swaps.undo()
            raise
    """

    def __init__(self, model):
        self.model = model
        # [parent, attribute, module replaced, new module, hooks of both before,
        #  the new module's hooks once the swap finished (None before)]
        self.done = []
        self._held_outside = None  # see held_outside_the_tree, found at the first swap

    def swap(self, name, new, warn=True):
        """Put ``new`` in place of the submodule called ``name``; return the
        module it replaced. ``warn=False`` for a module put back before the
        call returns (a probe): what it would say of the swap does not last."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        old = getattr(parent, child)
        if warn and self._held_outside is None:
            self._held_outside = held_outside_the_tree(self.model)
        # Remembered first: a swap an interrupt stops halfway is undone too.
        record = [parent, child, old, new, _hook_state(old), _hook_state(new), None]
        self.done.append(record)
        replaced = replace_module(self.model, name, new)
        record[-1] = _hook_state(new)  # finished: the hooks new holds in old's place
        if warn:
            self._warn(name, old, new)
        return replaced

    def warn_ahead(self, name, new):
        """What :meth:`swap` would warn of putting ``new`` at ``name``, said
        now: for a caller that then swaps with ``warn=False`` after changes
        it cannot take back exactly (a warning turned into an error would
        stop it halfway)."""
        if self._held_outside is None:
            self._held_outside = held_outside_the_tree(self.model)
        self._warn(name, self.model.get_submodule(name), new)

    def _warn(self, name, old, new):
        _warn_of_state_dict_hooks(name, old, new)
        _warn_of_references_outside(name, old, self._held_outside.get(id(old), ()))

    def undo(self, keep=0):
        """Put every replaced module back where it was, last swap first, and
        the hooks of both modules of each swap as they were before it (the
        same dicts, which the handles that registered the hooks hold, with the
        same entries in the same order); with ``keep``, only the swaps after
        the first ``keep``. The ``use_nested_tensor`` flag of torch's encoders
        is :func:`keeps_encoder_flags`' to put back."""
        while len(self.done) > keep:
            parent, child, old, new, old_hooks, new_hooks, *_ = self.done[-1]
            setattr(parent, child, old)
            _restore_hooks(new, new_hooks)
            _restore_hooks(old, old_hooks)
            self.done.pop()

    def put_back(self, keep=0):
        """Take back the swaps after the first ``keep`` that were made to be
        taken back (a probe, a block), last first, each replaced module with
        the hooks the module in its place holds by then (those added to it or
        removed from it meanwhile, by a calibration run or code in the block,
        stay so; see _hand_hooks_back). A swap that an interrupt stopped
        halfway is undone."""
        while len(self.done) > keep:
            parent, child, old, new, old_hooks, new_hooks, after = self.done[-1]
            if after is None or getattr(parent, child) is not new:
                self.undo(keep=len(self.done) - 1)
                continue
            setattr(parent, child, old)
            if _takes_hooks(old, new):
                _hand_hooks_back(old, new, old_hooks, new_hooks, after)
            self.done.pop()


# What nn.Module itself keeps in a module's __dict__ (its submodules,
# parameters, hooks, ...): not the attributes a model's own code sets.
_MODULE_OWN_ATTRIBUTES = frozenset(vars(nn.Module()))


def held_outside_the_tree(model):
    """{id(module): ["owner.attribute", ...]} for the modules that ``model``'s
    modules keep in plain Python lists, tuples, sets or dicts, nested ones
    too (``self._order = [self.fc1, self.fc2]``, ``{"main": [self.fc]}``):
    references outside the module tree, which replacing a submodule in place
    does not reach."""
    found = {}

    def visit(value, where, seen, depth):
        if isinstance(value, nn.Module):
            found.setdefault(id(value), []).append(where)
        elif (isinstance(value, (list, tuple, set, frozenset, dict)) and depth < 8
              and id(value) not in seen):
            seen.add(id(value))
            for item in (value.values() if isinstance(value, dict) else value):
                visit(item, where, seen, depth + 1)

    for owner_name, owner in model.named_modules():
        for attribute, value in vars(owner).items():
            if attribute not in _MODULE_OWN_ATTRIBUTES and not isinstance(value, nn.Module):
                visit(value, f"{owner_name}.{attribute}" if owner_name else attribute, set(), 0)
    return found


def _warn_of_references_outside(name, old, places):
    """Warn where ``old``, just replaced at ``name``, is also held outside the
    module tree (see held_outside_the_tree): code calling it from there still
    runs it, not the module in its place."""
    if places:
        warnings.warn(
            f"{name!r}: the {type(old).__name__} replaced there is also held in "
            f"{', '.join(sorted(set(places)))} (a plain Python container, outside the module "
            "tree), which the replacement does not reach: code that calls it from there "
            "still runs the replaced layer; keep layers in nn.ModuleList / nn.ModuleDict",
            stacklevel=stacklevel_outside_package())


def stacklevel_outside_package():
    """The ``stacklevel`` for a ``warnings.warn`` in the caller of this
    function that names the first frame outside this package: the user's
    call, however deep in the package the warning is raised. The frames of
    context-manager decorators (``@torch.no_grad()`` on a method) between
    package frames are passed over too."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    decorators = tuple(os.path.abspath(m.__file__) for m in (contextlib, torch.utils._contextlib))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(package) or path in decorators):
            break
        frame, level = frame.f_back, level + 1
    return level


# The state-dict hooks nn.Module keeps, by what registers them.
_STATE_DICT_HOOK_DICTS = {
    "_state_dict_pre_hooks": "register_state_dict_pre_hook",
    "_state_dict_hooks": "register_state_dict_post_hook",
    "_load_state_dict_pre_hooks": "register_load_state_dict_pre_hook",
    "_load_state_dict_post_hooks": "register_load_state_dict_post_hook",
}


def _spectral_norm_state_hook(hook):
    """Whether ``hook`` is one of the state-dict hooks torch's old
    ``nn.utils.spectral_norm`` registers: they belong with its weight hook,
    which stays behind by design (see _staying_hook_ids)."""
    hook = getattr(hook, "hook", hook)  # torch wraps some in a _WrappedHook
    return type(hook).__module__ == "torch.nn.utils.spectral_norm"


def _warn_of_state_dict_hooks(name, old, new):
    """Warn where ``old``, replaced by ``new``, has state-dict hooks: they do
    not move (move_hooks moves the forward and backward hooks), since they
    are written for ``old``'s keys (a Linear's ``weight``), which ``new``
    does not have; they stay with ``old`` and no longer run."""
    if not _takes_hooks(old, new):
        return  # new holds old, whose state still includes its hooks' output
    kinds = [how for attr, how in _STATE_DICT_HOOK_DICTS.items()
             if any(not _spectral_norm_state_hook(hook)
                    for hook in getattr(old, attr, {}).values())]
    if kinds:
        warnings.warn(
            f"{name!r}: the {type(old).__name__} replaced there has state-dict hooks "
            f"({', '.join(kinds)}), which stay with it and no longer run: they are written "
            f"for its keys, which the {type(new).__name__} in its place does not have; "
            "register them anew on the new layer if they still apply",
            stacklevel=stacklevel_outside_package())


def _hook_state(module):
    """What move_hooks and keep_off_fused_encoder_paths may change on
    ``module``: the kind of its backward hooks and each of its hook dicts
    with its entries."""
    return (module._is_full_backward_hook,
            [(attr, hooks, list(hooks.items())) for attr in _HOOK_DICTS
             if (hooks := getattr(module, attr, None)) is not None])


# The hook dicts torch keeps together: a hook's entry and its flags (kwargs,
# always called) are removed together by its handle, so they go one way.
_HOOK_GROUPS = (("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
                ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
                ("_backward_pre_hooks",), ("_backward_hooks",))


def _hand_hooks_back(old, new, old_state, new_state, after):
    """Give ``old``, back in the place ``new`` stood in (Swaps.put_back), the
    hooks ``new`` holds now that are not ``new``'s own (``new_state``, and the
    ones that stay with it), in their order, with ``old``'s hooks that stayed
    behind (weight norm, pruning) beside the neighbours they had; ``new``
    keeps what is left of its own. Per group of dicts, ``old`` gets back its
    own where hooks moved out of it (their handles, and those of hooks
    registered on ``new`` since, hold them: they moved to ``new``) or where
    none were registered on ``new``, else the ones ``new`` holds, where those
    went (where ``new`` had hooks of a kind before, the handles of one side
    cannot reach the other's, as when the hooks moved in)."""
    staying_new = _staying_hook_ids(new)
    olds = {attr: (hooks, entries) for attr, hooks, entries in old_state[1]}
    news = {attr: (hooks, entries) for attr, hooks, entries in new_state[1]}
    afters = {attr: entries for attr, _, entries in after[1]}
    for group in _HOOK_GROUPS:
        plans, back_to_old = [], None
        for attr in group:
            current = getattr(new, attr, None)
            if attr not in olds or attr not in news or current is None:
                continue
            old_dict, old_entries = olds[attr]
            new_dict, new_entries = news[attr]
            own = {i for i, _ in new_entries} | staying_new
            moved = {i for i, _ in afters.get(attr, ()) if i not in own}
            # Where both had hooks, old's dict was left behind when its hooks
            # joined new's: a handle of old's removed its hook there only.
            gone = {i for i in moved if old_dict is not current and i not in old_dict}
            order = [(i, hook) for i, hook in current.items() if i not in own and i not in gone]
            added = [i for i, _ in order if i not in moved]
            _place_staying(order, old_entries, moved)
            if back_to_old is None:  # the group's first dict decides for all of them
                back_to_old = bool(moved) or not added
            rest = [(i, hook) for i, hook in new_entries if i in current]
            rest += [(i, hook) for i, hook in current.items() if i in staying_new]
            plans.append((attr, old_dict, new_dict, current, order, rest))
        for attr, old_dict, new_dict, current, order, rest in plans:
            target = old_dict if back_to_old else current
            other = new_dict if new_dict is not target else type(new_dict)()
            target.clear()
            target.update(order)
            setattr(old, attr, target)
            other.clear()
            other.update(rest)
            setattr(new, attr, other)
    # The kind of the backward hooks goes with them: they ran on new.
    old._is_full_backward_hook = (new._is_full_backward_hook if getattr(old, "_backward_hooks", None)
                                  else old_state[0])
    new._is_full_backward_hook = new_state[0]


def _place_staying(order, old_entries, moved):
    """Insert into ``order`` (a list of (id, hook)) the entries of
    ``old_entries`` that did not move (they stayed with the module), each
    after the nearest of its old predecessors still there, else before the
    nearest successor, else where it was (first or last)."""
    ids = [i for i, _ in old_entries]
    for position, (i, hook) in enumerate(old_entries):
        if i in moved:
            continue
        where = {j: n for n, (j, _) in enumerate(order)}
        before = next((where[j] for j in reversed(ids[:position]) if j in where), None)
        after = next((where[j] for j in ids[position + 1:] if j in where), None)
        index = (before + 1 if before is not None else after if after is not None
                 else 0 if position == 0 else len(order))
        order.insert(index, (i, hook))


def _restore_hooks(module, state):
    module._is_full_backward_hook, dicts = state
    for attr, hooks, entries in dicts:
        hooks.clear()
        hooks.update(entries)
        setattr(module, attr, hooks)


# Where nn.Module keeps a module's own hooks, with the bookkeeping torch
# keeps beside them by hook id (which hooks take kwargs, which run even when
# forward raises); read with getattr, as a torch release may lack some. True
# where the moved hooks run before the new module's own: the order they ran
# in where the old module called the new one (peft's modules_to_save wrapper
# calls its copy; a LoRALinear that merge_lora takes out, its base layer),
# its pre-hooks outside the new module's, its forward and backward hooks after.
_HOOK_DICTS = {"_forward_pre_hooks": True, "_forward_pre_hooks_with_kwargs": True,
               "_forward_hooks": False, "_forward_hooks_with_kwargs": False,
               "_forward_hooks_always_called": False,
               "_backward_pre_hooks": True, "_backward_hooks": False}


def _torch_weight_hooks():
    """The hook types torch's weight_norm, spectral_norm and pruning register:
    they recompute the layer's own ``weight`` from tensors only that layer has."""
    # By module path: torch.nn.utils.weight_norm and .spectral_norm name the
    # functions there, not their modules.
    def module(name):
        return importlib.import_module(f"torch.nn.utils.{name}")
    return (module("weight_norm").WeightNorm, module("spectral_norm").SpectralNorm,
            module("prune").BasePruningMethod)


def weight_recomputed(layer, tensors=("weight",)):
    """Why one of ``layer``'s ``tensors`` (its weight; a LowRankLinear's
    factors ``A`` and ``B``) is recomputed at every use, or None: a
    parametrization, or torch's weight_norm / spectral_norm / pruning hook,
    which sets it anew from the layer's other tensors before every call. A
    change made to such a tensor (merging an adapter into it) is lost."""
    from torch.nn.utils import parametrize

    for name in tensors:
        if parametrize.is_parametrized(layer, name):
            chain = ", ".join(type(p).__name__ for p in layer.parametrizations[name])
            return (f"its {name} is parametrized ({chain}): computed at every use; "
                    "torch.nn.utils.parametrize.remove_parametrizations makes it a plain tensor")
    kinds = _torch_weight_hooks()
    # Each names the tensor it recomputes (pruning as _tensor_name): a bias's
    # hook leaves the weight alone.
    hooks = {}
    for h in layer._forward_pre_hooks.values():
        name = getattr(h, "name", getattr(h, "_tensor_name", None)) if isinstance(h, kinds) else None
        if name in tensors:
            hooks.setdefault(name, []).append(type(h).__name__)
    for name, kinds_found in hooks.items():
        return (f"its {name} is set anew before every call by torch's "
                f"{', '.join(kinds_found)} hook; remove it first "
                "(torch.nn.utils.remove_weight_norm, remove_spectral_norm or prune.remove)")
    return None


def _staying_hook_ids(module):
    """Ids of the hooks that stay with ``module``: the no-op pre-hook of
    keep_off_fused_encoder_paths (it leaves with the module), and torch's
    weight_norm / spectral_norm / pruning hooks, which would fail on a layer
    without their ``weight_g`` / ``weight_orig`` / ``weight_mask``."""
    kinds = _torch_weight_hooks()
    staying = {i for i, hook in module._forward_pre_hooks.items()
               if hook is _run_the_module or isinstance(hook, kinds)}
    return staying | {i for attr in _HOOK_DICTS for i, hook in getattr(module, attr, {}).items()
                      if isinstance(hook, kinds)}


def _takes_hooks(old, new):
    """Whether ``old``'s hooks move to ``new``: not where ``new`` holds ``old``
    (a LoRALinear around its base layer), which still runs them itself, as
    peft's wrapper runs those of its ``base_layer``."""
    return (isinstance(old, nn.Module) and isinstance(new, nn.Module)
            and not any(m is old for m in new.modules()))


def check_backward_hooks_combine(name, old, new):
    """Raise where putting ``new`` in ``old``'s place (named ``name``) would
    give one module backward hooks of both kinds (see move_hooks)."""
    if not _takes_hooks(old, new):
        return
    kinds = [m._is_full_backward_hook for m in (old, new) if m._backward_hooks]
    if len(set(kinds)) > 1:
        raise RuntimeError(f"cannot replace {name!r}: the module there and the one replacing it "
                           "have backward hooks of both kinds (register_backward_hook and "
                           "register_full_backward_hook), which torch does not run on one "
                           "module; remove one of them first")


def move_hooks(old, new):
    """Move the forward, forward pre-, backward and backward pre-hooks of
    ``old`` to ``new``, which takes ``old``'s place in a model.

    They belong to that place (torch's quantization swap carries hooks over
    too): a hook registered before a layer is compressed runs on the layer
    that replaced it. Where ``new`` holds ``old`` (``add_lora`` wraps a layer
    in a LoRALinear) nothing moves: the hooks stay with ``old``, which still
    runs them (see LoRALinear.forward), as in peft. Where ``new`` has no hooks
    of a kind, ``old``'s dict of them moves, so the handles that registered
    them still remove them; where it has some (merge_lora's base layer and its
    adapter both hooked), the moved hooks join ``new``'s dict, whose handles
    stay valid, and theirs no longer reach them. See _staying_hook_ids for
    the hooks that stay with ``old``.
    """
    if not _takes_hooks(old, new):
        return
    staying = _staying_hook_ids(old)
    for attr, moved_first in _HOOK_DICTS.items():
        moved, kept = getattr(old, attr, None), getattr(new, attr, None)
        if moved is None or kept is None or not moved.keys() - staying:
            continue
        if attr == "_backward_hooks":
            new._is_full_backward_hook = old._is_full_backward_hook
            old._is_full_backward_hook = None
        entries = [(i, hook) for i, hook in moved.items() if i not in staying]
        leaving = type(moved)((i, hook) for i, hook in moved.items() if i in staying)
        entries = entries + list(kept.items()) if moved_first else list(kept.items()) + entries
        target = kept if kept else moved
        target.clear()
        target.update(entries)
        setattr(new, attr, target)
        setattr(old, attr, leaving)


def places_of(model):
    """{id(module): every name it is registered under in ``model``}.

    A module may sit in several places; ``named_modules()`` lists only the first.
    """
    places = {}
    for name, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    return places


def storage_of(tensor):
    """Where ``tensor``'s elements live, or None for a tensor that holds none
    to share with a layer's weight (meta, fake, empty, lazy, or sharded: a
    DTensor's local shard is another matter, refused later), or none torch
    shows: a sparse, mkldnn or nested tensor, or a tensor subclass whose
    elements live in inner tensors (their storage raises)."""
    # (is_lazy first: an uninitialized parameter raises at numel().)
    if (not isinstance(tensor, torch.Tensor) or nn.parameter.is_lazy(tensor) or tensor.is_meta
            or tensor.numel() == 0 or is_sharded(tensor)
            or tensor.layout != torch.strided or tensor.is_nested or not holds_values(tensor)):
        return None
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass, say
        return None
    # 0 for a storage resized to nothing: no elements to share.
    return (tensor.device, pointer) if pointer else None


def _byte_span(tensor, storage):
    """(first byte, end byte) in ``storage`` of the memory ``tensor``'s elements may reach."""
    start = tensor.storage_offset() * tensor.element_size()
    reach = 1 + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    return start, start + reach * tensor.element_size()


def model_tensors(model):
    """(module, attribute name, qualified name, tensor) for every parameter and
    buffer, tied ones once per owner (``remove_duplicate=False``)."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                yield module, attr, prefix + attr, tensor


def weights_tied_elsewhere(model, layers):
    """{name: names of the tensors of other modules in ``model``} for each of
    ``layers`` ({name: layer}) whose weight is such a tensor itself (a tie: an
    output head sharing its embedding table) or may share elements with it
    (another Parameter made over the same memory, or a view of it): an
    in-place write to the weight (a merge, PiSSA's residual) would change them
    too. Views that interleave without touching count too: only the memory
    each may reach is compared. Layers with no such tensor are left out.
    One pass over the model's tensors for all the layers."""
    holders, by_storage = {}, {}
    for module, _, where, tensor in model_tensors(model):
        holders.setdefault(id(tensor), []).append((module, where))
        storage = storage_of(tensor)
        if storage is not None:
            by_storage.setdefault(storage, []).append(
                (module, where, tensor, _byte_span(tensor, storage)))
    tied = {}
    for name, layer in layers.items():
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        found = [where for module, where in holders.get(id(weight), ()) if module is not layer]
        storage = storage_of(weight)
        if storage is not None:
            start, end = _byte_span(weight, storage)
            found += [where for module, where, tensor, (first, last) in by_storage.get(storage, ())
                      if module is not layer and tensor is not weight
                      and first < end and start < last]
        if found:
            tied[name] = list(dict.fromkeys(found))
    return tied


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


def _swapped_layers(encoder):
    """The layers below ``encoder`` that keep_off_fused_encoder_paths marked
    (the modules themselves: held, no id of theirs is reused meanwhile)."""
    return {m for m in encoder.modules() if _run_the_module in m._forward_pre_hooks.values()}


@contextlib.contextmanager
def encoder_flags_kept(model):
    # Anything but a module is the function's own error to report.
    modules = model.modules() if isinstance(model, nn.Module) else ()
    before = {m: m.__dict__["use_nested_tensor"] for m in modules
              if isinstance(m, nn.TransformerEncoder) and "use_nested_tensor" in m.__dict__}
    # Layers swapped in by an earlier call: a flag the user set again since
    # (such layers take nested tensors) is not this call's to change.
    earlier = {encoder: _swapped_layers(encoder) for encoder in before}
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
            if not (succeeded and _swapped_layers(encoder) - earlier[encoder]):
                encoder.use_nested_tensor = flag


def keeps_encoder_flags(function):
    """For a function ``f(model, ...)`` that swaps layers and, should it fail,
    leaves the model as it was. While it runs, torch's ``nn.TransformerEncoder``
    modules in the model do not pack padded batches into nested tensors (the
    flag keep_off_fused_encoder_paths sets); afterwards each gets its
    ``use_nested_tensor`` back unless a layer this call swapped in stays below
    it, and every one gets it back when the function fails."""
    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        with encoder_flags_kept(model):
            return function(model, *args, **kwargs)
    return wrapper


COMPILED_ALONE_WHY = (
    "torch.compile wraps this module on its own, and its compiled wrapper calls the module "
    "it was given, so a module put in its place would never run; change the model before "
    "compiling it (or compile the model as a whole)")


def compiled_alone(model):
    """Ids of the modules that a ``torch.compile`` wrapper in ``model`` (or
    ``model`` itself) wraps. The wrapper's forward is bound to the module it
    was given: replacing its ``_orig_mod`` would change the model's names and
    state_dict while the model kept computing with the old module. (The
    modules *inside* a compiled module are another matter: its forward looks
    them up when it runs, and dynamo recompiles.)"""
    optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if optimized is None:
        return set()
    return {id(m._orig_mod) for m in model.modules() if isinstance(m, optimized)}


def compiled_original(model):
    """The module ``torch.compile`` wrapped, for its ``OptimizedModule``
    (whose own names carry an ``_orig_mod.`` prefix); anything else as it is.
    Looked up only when torch._dynamo is already imported: compiling imported it."""
    optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


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


def instance_forward(module):
    """Whether a forward was set on this one module (``module.forward = f``;
    accelerate's add_hook_to_module does so for device_map and offloading).
    Calling the module runs it, but a layer replacing or wrapping the module
    reads its weight and never calls it. The class's own forward bound again
    (what accelerate's remove_hook_from_module leaves behind) is not one."""
    if "forward" not in vars(module):
        return False
    forward = vars(module)["forward"]
    return not (getattr(forward, "__self__", None) is module
                and getattr(forward, "__func__", None) is type(module).forward)


def instance_forward_text(module):
    """"a forward set on the instance", naming accelerate's hook where it set
    it: for the messages that leave such a module alone or refuse it."""
    hooked = " (accelerate's _hf_hook)" if hasattr(module, "_hf_hook") else ""
    return f"a forward set on the instance{hooked}"


def has_own_forward(linear):
    """Whether an ``nn.Linear`` (subclass) computes with a forward of its own,
    its class's or one set on the instance (see instance_forward): the ops
    read its weight and bias and never call it, so converting it would
    compute nn.Linear's function instead (torch's NonDynamicallyQuantizableLinear
    keeps nn.Linear's forward and converts)."""
    return type(linear).forward is not nn.Linear.forward or instance_forward(linear)


def _recomputing_hook_tensors(layer):
    """The names of the tensors from which torch's weight_norm, spectral_norm
    and pruning hooks on ``layer`` compute its weight or bias (``weight_g``,
    ``weight_orig``, ``weight_mask``, ...)."""
    names, kinds = set(), _torch_weight_hooks()
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, kinds):
            tensor = getattr(hook, "name", getattr(hook, "_tensor_name", None))
            names |= {f"{tensor}_{part}" for part in ("g", "v", "u", "orig", "mask")}
    return names


def held_besides_weight(layer):
    """What ``layer`` (an nn.Linear or Conv1D) holds besides its weight and
    bias, as ``name (kind)`` strings: further parameters and buffers, and
    submodules (a quantization observer, say). A LowRankLinear put in its
    place has none of them, so they would be lost (from the model and its
    state_dict). The tensors torch's weight_norm, spectral_norm and pruning
    hooks compute the weight from are not counted: the new layer takes the
    weight they computed, which is all they stand for."""
    recomputing = _recomputing_hook_tensors(layer)
    held = [f"{name} (parameter)" for name in layer._parameters
            if name not in ("weight", "bias") and name not in recomputing]
    held += [f"{name} (buffer)" for name in layer._buffers if name not in recomputing]
    held += [f"{name} (submodule)" for name in layer._modules]
    return held


# A Linear's (or Conv1D's) own attributes, which a LowRankLinear in its place
# has in its own way: not the ones a model's code set on the layer.
_LINEAR_OWN_ATTRIBUTES = _MODULE_OWN_ATTRIBUTES | {"in_features", "out_features", "nf", "nx",
                                                   "weight", "bias", "forward"}


def plain_attributes(layer):
    """The public plain Python attributes a model's code set on ``layer``
    (``layer.tag = ...``), which a layer put in its place does not have.
    Private ones (``_is_hf_initialized``, ...) are libraries' bookkeeping."""
    return [name for name in vars(layer)
            if name not in _LINEAR_OWN_ATTRIBUTES and not name.startswith("_")]


def is_linear_layer(module):
    """An ``nn.Linear`` (not a subclass) or a transformers ``Conv1D``: what
    compression swaps for a LowRankLinear."""
    return type(module) is nn.Linear or is_conv1d(module)


def dense_weight(layer):
    """The layer's weight as an (out, in) matrix: ``weight``, or its transpose for a Conv1D."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


def refuse_distributed_wrapper(model, owner):
    """A TypeError where ``model`` is, or holds, a DistributedDataParallel
    wrapper: it keeps the parameters it found when it was made and
    all-reduces only their gradients, so layers swapped in afterwards (and
    their new parameters) were trained on each rank's data alone, and the
    replicas drifted apart without a word."""
    from torch.nn.parallel import DistributedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, DistributedDataParallel):
            where = "the model is" if not name else f"{name!r} is"
            raise TypeError(
                f"{owner}: {where} a DistributedDataParallel wrapper, which would go on "
                "synchronizing the parameters it was made with, not the new layers' (the "
                f"replicas then drift apart); call {owner} on every rank on the model it "
                "wraps (its .module) before wrapping it, then wrap it anew")


def is_sharded(tensor):
    """Whether ``tensor`` is a DTensor (FSDP2's fully_shard makes its parameters so)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(tensor, DTensor)


# For the savers: what a sharded model needs before it can be written whole.
GATHER_FIRST = ("a sharded DTensor (FSDP2's fully_shard): each rank holds a shard only; "
                "load the full state dict into an unsharded copy of the model "
                "(torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                "StateDictOptions(full_state_dict=True)) and save that")


def fsdp_managed(module):
    """Whether ``module`` or a module inside it is an FSDP2 unit
    (``fully_shard`` makes it an ``FSDPModule``), or holds sharded tensors."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()
    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        is_sharded(p) for p in module.parameters())


# Why an FSDP-managed layer is not merged: FSDP keeps the sharded parameters
# and gathers from them, so a merge written into the gathered copies (or new
# factors) was undone at the next gathering, the adapter lost.
FSDP_MERGE_WHY = ("it is managed by FSDP2 (fully_shard), which gathers its parameters from "
                  "their shards at every use, so a merged weight would be replaced by the "
                  "unmerged one (the adapter lost); merge in an unsharded copy of the model")
