"""Calibration: running the user's forward passes and collecting what compression needs."""

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Mapping

import torch
from torch import nn

from ._modules import dense_weight
from ._names import preview


def token_mask_of(batch, key="attention_mask"):
    """The 2-D mask named ``key`` of a dict batch, or of a dict inside a tuple
    batch (a sentence-transformers model is called as ``model(features)``)."""
    candidates = [batch] if isinstance(batch, Mapping) else (
        [b for b in batch if isinstance(b, Mapping)] if isinstance(batch, (tuple, list)) else [])
    for candidate in candidates:
        mask = candidate.get(key)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


def floating_tensors(output):
    """The floating-point tensors in a (nested) model output, in a fixed order."""
    return [t for t in _tensors(output) if t.is_floating_point()]


class PaddingMasks:
    """Which of the running batch's token masks applies to a tensor seen at a module of ``model``.

    A batch's ``attention_mask`` describes the tokens of one input, and matching
    it to tensors by shape alone applies it wherever the lengths happen to agree.
    So, for a tensor seen at a module (a layer's input, a module's output):

    - in an encoder-decoder model (``config.is_encoder_decoder`` and
      ``get_encoder()``, the model's own or a part's when it is wrapped),
      ``attention_mask`` applies inside the encoder and to the tensors the
      encoder returned (the decoder's cross-attention reads them) and to
      what modules taking nothing else made of them (a projection), the
      batch's ``decoder_attention_mask``, if any, to the rest of the model
      owning the encoder, and no mask to the parts of the model beside
      that owner (Blip2's vision model beside its T5);
    - in other models whose input embedding is known (``get_input_embeddings()``
      of the model, or else the first ``nn.Embedding`` one of its parts gives:
      ``CLIPModel`` has none of its own), no mask applies inside another
      tower, a part beside the path from the model to that embedding with an
      input embedding of its own (``get_input_embeddings()``, or a patch
      convolution), such as CLIP's vision model, nor to what a tower
      returned; ``attention_mask`` applies to everything else;
    - in any other model, ``attention_mask`` applies everywhere.

    :func:`mask_for` then says whether the chosen mask fits the tensor. Use it
    as a context manager (its hooks are in place inside), with :meth:`start`
    and :meth:`stop` around each batch's forward pass.
    """

    def __init__(self, model):
        self._model = model
        pairs = _encoders(model)
        if pairs:
            # (region, the mask applying inside it and to what it returns),
            # each encoder after the model owning it, whose decoder side
            # takes the decoder's mask; outside those owners (Blip2's vision
            # model beside its T5) no mask applies.
            self._regions = ([(owner, "decoder_attention_mask") for owner, _ in pairs]
                             + [(encoder, "attention_mask") for _, encoder in pairs])
            self._sources = [encoder for _, encoder in pairs]
            self._default = None
        else:
            self._regions = [(tower, None) for tower in _towers(model)]
            self._sources = [tower for tower, _ in self._regions]
            self._default = "attention_mask"
        self._inside = {}
        self._handles = []
        self.stop()

    def __enter__(self):
        # Taken now, not at construction: compress_model swaps layers in
        # between calibration runs. An encoder's modules take its key over
        # its owner's.
        self._inside = {id(m): key for region, key in self._regions for m in region.modules()}
        try:
            for region, key in self._regions:
                # First among the region's hooks, so that the others (which may
                # ask about its outputs) run after it has recorded them.
                if takes_hooks(region):
                    self._handles.append(region.register_forward_hook(
                        eager_hook(self._recorder(key)), prepend=True))
            if self._sources:
                # What a module outside the encoders (towers) makes of their
                # outputs alone holds their tokens too: EncoderDecoderModel
                # projects its encoder's output (enc_to_dec_proj) before the
                # decoder's cross-attention reads it.
                within = {id(m) for source in self._sources for m in source.modules()}
                passer = eager_hook(self._passer)
                for module in self._model.modules():
                    if id(module) not in within and takes_hooks(module):
                        self._handles.append(module.register_forward_hook(
                            passer, prepend=True, with_kwargs=True))
        except BaseException:  # no hooks left behind, whatever stopped it
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inside = {}
        self.stop()

    def start(self, batch):
        """Take the masks of ``batch``, whose forward pass comes next."""
        self.stop()
        masks = {key: token_mask_of(batch, key) for key in ("attention_mask",
                                                             "decoder_attention_mask")}
        self._masks = {key: mask for key, mask in masks.items() if mask is not None}

    def stop(self):
        """Forget the batch's masks and what its forward pass produced."""
        self._masks = {}
        # What the regions returned, by place: (tensor, the mask key). The
        # tensors are held, so no other tensor takes their memory meanwhile.
        self._produced = {}

    def of(self, t, module):
        """The running batch's 2-D mask that applies to ``t`` seen at ``module``; None if none."""
        if not self._masks:
            return None
        produced = self._produced.get(_place(t))
        key = produced[1] if produced is not None else self._inside.get(id(module), self._default)
        return None if key is None else self._masks.get(key)

    def _passer(self, module, args, kwargs, output):
        """Record ``output`` as a region's where every tensor ``module`` took
        came from that region (a module given token ids or masks besides, as
        a decoder is, has tokens of its own)."""
        if not self._produced:
            return
        keys = set()
        for t in _tensors((args, kwargs)):
            produced = self._produced.get(_place(t)) if t.is_floating_point() else None
            if produced is None:
                return
            keys.add(produced[1])
        if len(keys) == 1:
            self._recorder(keys.pop())(module, args, output)

    def _recorder(self, key):
        def hook(module, args, output):
            if not self._masks:
                return
            # The region's outputs are matched by place, not by object: a
            # model may pass on a view of them (same memory, same shape).
            for t in floating_tensors(output):
                place = _place(t)
                # The first region to return a tensor made it: an owner
                # passes on its encoder's output too.
                if place is not None and place not in self._produced:
                    self._produced[place] = (t, key)
        return hook


def takes_hooks(module):
    """False for a TorchScript module, whose hooks torch refuses to register
    (its outputs go unrecorded; what runs inside it has no nn.Linear layers)."""
    return not isinstance(module, torch.jit.ScriptModule)


def eager_hook(hook):
    """``hook`` run eagerly where the model is compiled: traced by torch.compile,
    the version counters that tell an input changed in place between two
    layers (:func:`_unchanged`) do not see an in-place update made in the
    compiled code, and a layer would be given another one's XᵀX."""
    return torch.compiler.disable(hook)


def _tensors(value):
    """The tensors in a (nested) tuple, list, dict or dataclass, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):  # dicts, ModelOutput, tokenizers' BatchEncoding
        return [t for key in value for t in _tensors(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A model's own output class (ModelOutput above is a Mapping too).
        return [t for field in dataclasses.fields(value)
                for t in _tensors(getattr(value, field.name, None))]
    return []


def _place(t):
    """Where ``t``'s values lie, (device, address, shape); None where it has no one address."""
    if t.is_nested:
        return None
    try:
        return t.device, t.data_ptr(), tuple(t.shape)
    except RuntimeError:  # a tensor subclass without storage
        return None


def _contains(module, part):
    """True when ``part`` is ``module`` or one of its submodules."""
    return any(m is part for m in module.modules())


def _own_input_embedding(module):
    """What ``module.get_input_embeddings()`` gives when it is a part of ``module``, else None."""
    get = getattr(module, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        found = get()
    except (NotImplementedError, AttributeError):  # transformers' answer where it cannot tell
        return None
    return found if isinstance(found, nn.Module) and _contains(module, found) else None


def _encoders(model):
    """[(owner, encoder)] for the encoder-decoder models in ``model`` (itself or
    its parts): each encoder with the innermost model whose ``get_encoder()``
    gives it (Blip2's T5 rather than Blip2, which gives it too)."""
    found = {}
    for module in model.modules():  # outer modules first: inner owners win
        get = getattr(module, "get_encoder", None)
        if not (getattr(getattr(module, "config", None), "is_encoder_decoder", False)
                and callable(get)):
            continue
        try:
            encoder = get()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(encoder, nn.Module) and encoder is not module and _contains(module, encoder):
            found[id(encoder)] = (module, encoder)
    return list(found.values())


def _input_embedding(model):
    """The module embedding the tokens ``attention_mask`` describes, or None.

    The model's ``get_input_embeddings()``, or else the first ``nn.Embedding``
    that one of its parts' gives (CLIPModel has none of its own, its text
    model has; its vision model's, a convolution, is passed over).
    """
    for module in model.modules():
        found = _own_input_embedding(module)
        if found is not None and (module is model or isinstance(found, nn.Embedding)):
            return found
    return None


def _is_patch_embedding(module):
    """A convolution cutting its input into patches, as vision transformers embed images."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and module.stride == module.kernel_size and max(module.kernel_size) > 1)


def _towers(model):
    """The parts of ``model`` beside the path to its input embedding that embed
    an input of their own (CLIP's vision model); [] where that embedding is unknown.

    Parts holding only other embeddings (positions, relative attention biases)
    or convolutions of other kinds (Mamba's) are no towers: their tokens are
    the input's.
    """
    embedding = _input_embedding(model)
    if embedding is None:
        return []
    weight = getattr(embedding, "weight", None)

    def embeds_the_input(module):
        # A copy tied to the embedding's weight is the same embedding: T5's
        # encoder embeds with its own module over the weight of the model's.
        return module is embedding or (weight is not None
                                       and getattr(module, "weight", None) is weight)

    path = next(name for name, m in model.named_modules() if m is embedding)
    towers, node = [], model
    for part in path.split(".") if path else []:
        on_path = node.get_submodule(part)
        towers += [child for child in node.children()
                   if child is not on_path and not any(map(embeds_the_input, child.modules()))
                   and any(_is_patch_embedding(m) or _own_input_embedding(m) is not None
                           for m in child.modules())]
        node = on_path
    return towers


def mask_for(t, mask):
    """The batch's (batch, tokens) ``mask`` laid out as the two leading dims
    of a layer's input ``t``, (batch, tokens, ..., features) of any rank from
    3 (a layer applied per head too) or token-first (tokens, batch, ...,
    features) as torch's ``nn.Transformer`` layers take it; None when ``t`` is
    neither (a pooled input). A square batch (as many sequences as tokens)
    cannot tell the two apart and is read batch-first, as transformers models
    are; otherwise :func:`per_token_layout`'s rule, which the outputs follow."""
    if mask is None or t.dim() < 3:
        return None
    return per_token_layout(t, mask)


def per_token_layout(t, mask):
    """The batch's (batch, tokens) ``mask`` laid out as the two leading dims of
    an output ``t`` with an entry (a number, a row, a block) per token: (batch,
    tokens, ...) of any rank from 2 (a question-answering head's scores), or
    token-first (tokens, batch, ...) as torch's ``nn.Transformer`` layers give
    them; None for any other shape (a pooled output). A square batch reads
    batch-first, as in :func:`mask_for`. An attention map (batch, heads,
    tokens, tokens) is not per-token where the heads happen to number the
    tokens, nor is (batch, heads, tokens, ...) with as many heads as tokens,
    which reads as (batch, tokens, heads, ...) too. The sensitivity probes,
    ``distill`` and the calibration of layer inputs (:func:`mask_for`) all
    leave padding out by this rule."""
    if mask is None or t.dim() < 2:
        return None
    if t.dim() >= 4 and t.shape[-1] == t.shape[-2] == mask.shape[1]:
        return None
    if tuple(t.shape[:2]) == tuple(mask.shape):
        if t.dim() >= 4 and t.shape[2] == mask.shape[1]:
            # (batch, heads, tokens, ...) with as many heads as tokens reads as
            # (batch, tokens, heads, ...) too: which dim the tokens are is
            # unknown, and everything is kept rather than the wrong part left out.
            return None
        return mask
    if tuple(t.shape[:2]) == tuple(mask.T.shape):
        return mask.T
    return None


def without_padding(t, mask):
    """The rows of a per-token ``t`` at real tokens, (n, features); ``t`` as it
    is where ``mask`` does not fit it (see :func:`mask_for`)."""
    mask = mask_for(t, mask)
    return t if mask is None else t[mask.to(t.device) != 0]


def _raised(exc):
    """The RuntimeError naming an exception the user's calibration raised."""
    return RuntimeError(f"compress_model: the calibration raised {type(exc).__name__}: {exc}")


def copy_of_batch(batch):
    """``batch`` with copies of its tensors (of a tensor, tuple, list or dict);
    anything else as it is. A tuple or list comes back as a plain one (a
    namedtuple too), which call_with_batch unpacks the same way. The copies
    are detached (no gradient reaches the caller's tensors) and, made outside
    ``torch.inference_mode``, ordinary tensors even where the batch's are
    inference tensors."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, (tuple, list)):
        items = [copy_of_batch(item) for item in batch]
        return tuple(items) if isinstance(batch, tuple) else items
    if isinstance(batch, Mapping):
        return {key: copy_of_batch(value) for key, value in batch.items()}
    return batch


def _run_batches(model, calibration, masks=None):
    """Run the calibration, each batch between ``masks.start`` and ``masks.stop``
    (:class:`PaddingMasks`).

    Returns the number of batches, None for a callable.
    """
    if callable(calibration):
        calibration(model)
        return None
    if isinstance(calibration, (torch.Tensor, Mapping, tuple)):
        raise TypeError(
            "compress_model: calibration must be a callable fn(model) or an iterable of "
            f"batches, got a single {type(calibration).__name__}; wrap it in a list")
    try:
        batches = iter(calibration)
    except TypeError:
        raise TypeError(
            "compress_model: calibration must be a callable fn(model) or an iterable of "
            f"batches, got {type(calibration).__name__}") from None
    count = 0
    for count, batch in enumerate(batches, 1):
        # A copy per run: a model that changes its inputs in place
        # (x.sub_(mean)) would give every later run other inputs, and
        # change the caller's tensors.
        batch = copy_of_batch(batch)
        if masks is not None:
            masks.start(batch)
        try:
            call_with_batch(model, batch, "compress_model", "a calibration batch")
        finally:
            if masks is not None:
                masks.stop()
    return count


def replayable(calibration):
    """``calibration`` in a form that runs the same batches every time.

    A callable or a list is returned as it is. Any other iterable (a
    generator, which is spent after one run; a shuffled DataLoader, which
    deals other batches each time) is read once into a list. Calibrations of
    the wrong kind are left for the first run to refuse.
    """
    if callable(calibration) or isinstance(calibration, (list, torch.Tensor, Mapping, tuple)):
        return calibration
    try:
        batches = iter(calibration)
    except TypeError:
        return calibration
    try:
        return list(batches)
    except Exception as exc:
        raise _raised(exc) from exc


def call_with_batch(model, batch, owner, what="a batch"):
    """``model(x)`` for a tensor, ``model(*b)`` for a tuple or list, ``model(**b)`` for a dict."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        try:
            return model(*batch)
        except TypeError as exc:
            if len(batch) > 1 and "positional argument" in str(exc):
                # The usual cause: a DataLoader of (input, label) pairs.
                raise TypeError(
                    f"{exc} (a tuple batch of {len(batch)} items is called as "
                    "model(*batch); for (input, label) pairs give the inputs alone, e.g. "
                    "[x for x, _ in loader])") from exc
            raise
    if isinstance(batch, Mapping):  # dicts and tokenizers' BatchEncoding
        return model(**batch)
    raise TypeError(f"{owner}: {what} must be a tensor, tuple or dict, got {type(batch).__name__}")


def set_eval_flags(modules):
    """Put ``modules`` in eval mode by their ``training`` flags, as the modes are
    restored after: ``model.eval()`` would run any ``train()`` a model
    overrides (one that also freezes its parameters, say), whose other effects
    nothing would undo."""
    for module in modules:
        module.training = False


# The random-number state every calibration run starts from, inside
# same_random_numbers: (CPU state, CUDA device indices, their states).
_RUN_RNG = contextvars.ContextVar("lowrank_ext_calibration_rng", default=None)


def _cuda_devices(model):
    return sorted({t.device.index if t.device.index is not None else 0
                   for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})


def _rng_state(devices):
    return (torch.get_rng_state(), devices, [torch.cuda.get_rng_state(d) for d in devices])


def same_random_numbers(function):
    """Decorate a ``function(model, ...)`` whose calibration runs are compared
    with each other (the Gram run, the sensitivity probes): each run starts
    from the random-number state the call began with, so that a model that
    draws random numbers in its forward (noise, sampling) gives every run the
    same ones, and the caller's generators are left as they were."""
    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        devices = _cuda_devices(model) if isinstance(model, nn.Module) else []
        token = _RUN_RNG.set(_rng_state(devices))
        try:
            return function(model, *args, **kwargs)
        finally:
            _RUN_RNG.reset(token)
    return wrapper


@contextlib.contextmanager
def _replayed_random_numbers(model):
    """One calibration run: from the state of ``same_random_numbers`` (else the
    current one), the generators put back after."""
    state = _RUN_RNG.get()
    if state is None:
        state = _rng_state(_cuda_devices(model))
    cpu, devices, cuda = state
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        for device, device_state in zip(devices, cuda):
            torch.cuda.set_rng_state(device_state, device)
        yield


def run_calibration(model, calibration, masks=None, allow_empty=False):
    """Run ``calibration`` on ``model`` in eval mode under no_grad, restoring the modes after.

    The run starts from the random-number state of ``same_random_numbers``
    (else the current one) and leaves torch's generators as they were.

    An exception from the calibration is re-raised as RuntimeError naming it;
    a calibration of the wrong kind is a TypeError. An empty iterable is a
    ValueError unless ``allow_empty`` (one rank's share of the data may be
    empty: the other ranks' shares calibrate the layers).

    Returns the number of batches run, None for a callable.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        set_eval_flags(modes)
        with torch.no_grad(), _replayed_random_numbers(model):
            count = _run_batches(model, calibration, masks)
    except Exception as exc:
        if isinstance(exc, TypeError) and str(exc).startswith("compress_model:"):
            raise  # a calibration of the wrong kind, already said so
        raise _raised(exc) from exc
    finally:
        for module, mode in modes.items():
            module.training = mode
    if count == 0 and not allow_empty:
        raise ValueError("compress_model: the calibration is an empty iterable: it gave no "
                         "batches to run")
    return count


def collect_input_grams(model, layers, calibration, stages=None, allow_unseen=False):
    """{name: XᵀX in float64} over the inputs each layer sees during ``calibration``.

    Layers fed the same inputs throughout (attention's q, k and v) get one
    tensor between them: nothing may update a returned matrix in place
    without copying it first.

    A layer the calibration never ran is a ValueError, or with
    ``allow_unseen`` (another rank's share of the data may reach it) None;
    with ``allow_unseen`` an empty calibration iterable is accepted too.

    When ``stages`` is a list, it receives the layer names in the order of
    their first call, grouped into lists of layers fed the same tensor.

    The hooks are removed whatever happens; see ``run_calibration``.
    """
    grams = {name: None for name in layers}
    holders, seen = {}, set()
    # Layers fed the same tensor one after another (attention's q, k, v) share
    # one product: remember the last input, its XᵀX and the layers fed it
    # (once per call), whose sums take it when the next input comes.
    last = {"key": None, "mask": None, "gram": None, "fed": [], "opened": False}
    # Padding tokens carry no meaning but would pull the whitening towards
    # their activations: rows of inputs where the mask that applies to them
    # (PaddingMasks) is 0 are left out.
    masks = PaddingMasks(model)

    def make_hook(name, k):
        def hook(module, args, kwargs):
            # nn.Linear calls its argument input, transformers' Conv1D x.
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if x.dim() == 0 or x.size(-1) != k:
                # A batch of the wrong width: record nothing, so that the
                # layer raises its own error naming the shapes it was given.
                return
            mask = masks.of(x, module)
            same = (last["key"] is not None and _unchanged(last["key"], x)
                    and last["mask"] is mask)
            opened = False
            if stages is not None and name not in seen:
                # With the stage of the layers fed this tensor before, if this
                # tensor opened the last stage: not where it was fed only to
                # layers seen before (a layer called again), which may have
                # made it, after the last stage began.
                if same and stages and last["opened"]:
                    stages[-1].append(name)
                else:
                    stages.append([name])
                    opened = True
            seen.add(name)
            if not same:
                _add_product(grams, holders, last["gram"], last["fed"])
                if x.is_nested:
                    # torch's TransformerEncoder packs a padded batch into a
                    # nested tensor in inference: its sequences, no padding.
                    x64 = torch.cat([seq.reshape(-1, k) for seq in x.detach().unbind()])
                else:
                    x64 = without_padding(x.detach(), mask).reshape(-1, k)
                x64 = x64.to(torch.float64)
                last.update(key=_input_key(x), mask=mask, gram=x64.T @ x64, fed=[], opened=False)
            last["opened"] = last["opened"] or opened
            last["fed"].append(name)
        return hook

    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(
                eager_hook(make_hook(name, dense_weight(module).shape[1])), with_kwargs=True))
        with masks:
            run_calibration(model, calibration, masks, allow_empty=allow_unseen)
        _add_product(grams, holders, last["gram"], last["fed"])
    finally:
        last.clear()
        for handle in handles:
            handle.remove()
    check_all_seen([name for name, g in grams.items() if g is None] if not allow_unseen else [])
    return grams


def _add_product(grams, holders, product, fed):
    """Add XᵀX ``product`` to the sums in ``grams`` of the layers ``fed`` it (a name per call).

    Layers whose sums were one tensor and take the product equally go on
    sharing a tensor: it is updated in place where no other layer holds it
    (``holders``: id of a sum -> how many layers hold it), else copied first,
    so that a layer fed other inputs than the rest of its group keeps a sum
    of its own. The product itself, used no more, becomes the first new sum.
    """
    calls = {}
    for name in fed:
        calls[name] = calls.get(name, 0) + 1
    groups = {}  # (id of the sum held, calls) -> the layers holding it and fed it that often
    for name, count in calls.items():
        groups.setdefault((id(grams[name]), count), []).append(name)
    spare = product
    for (_, count), names in groups.items():
        total = grams[names[0]]
        if total is None and count == 1 and spare is not None:
            total, spare, count = spare, None, 0
        elif total is None:
            total, count = product.clone(), count - 1
        elif holders[id(total)] != len(names) or (total.is_inference()
                                                   and not torch.is_inference_mode_enabled()):
            # Held by other layers too, or made under inference_mode (the last
            # product is added after the calibration, outside it).
            total = total.clone()
        for _ in range(count):
            total.add_(product)
        for name in names:
            old = grams[name]
            if old is not None:
                holders[id(old)] -= 1
                if not holders[id(old)]:
                    del holders[id(old)]
            grams[name] = total
            holders[id(total)] = holders.get(id(total), 0) + 1


def _input_key(x):
    """What tells, at the next layer's call, whether it is fed this input unchanged.

    The tensor itself (not its address, which a new tensor may reuse) and its
    version counter, which in-place updates bump. Inference tensors have no
    version counter yet may be updated in place between two layers (a
    residual ``h += layer(h)``): for them a copy of the values is kept to
    compare with (none for a packed nested tensor, never reused).
    """
    if not x.is_inference():
        return x, x._version
    return x, None if x.is_nested else x.detach().clone()


def _unchanged(key, x):
    """True when ``x`` is the input ``key`` (see :func:`_input_key`) was taken of, unchanged."""
    held, state = key
    if held is not x:
        return False
    if not x.is_inference():
        return state == x._version
    return state is not None and torch.equal(state, x)


def check_all_seen(unseen):
    """The ValueError for layers no calibration batch reached."""
    if unseen:
        raise ValueError(
            f"compress_model: the calibration never ran layer(s) {preview(unseen)}; "
            "give batches that reach every compressed layer, or exclude those layers")


def check_inputs_not_all_zero(grams):
    """The ValueError for layers whose calibration inputs were all zero (or all
    padding), over every rank's share of the data: as for a layer never run,
    nothing measures which directions of its weight matter."""
    # XᵀX is positive semi-definite: its largest entry is on its diagonal. One
    # below float64's smallest normal number holds no digits to whiten with.
    tiny = torch.finfo(torch.float64).tiny
    zero = [name for name, gram in grams.items()
            if gram is not None and not float(gram.diagonal().max()) >= tiny]
    if zero:
        raise ValueError(
            f"compress_model: the calibration gave layer(s) {preview(zero)} only zero inputs "
            "(or only padding tokens, or values so small that XᵀX underflows float64), which say nothing about how to truncate them; give "
            "batches that reach them with real inputs, or exclude those layers")
