"""Calibration: running the user's forward passes and collecting what compression needs."""

from collections.abc import Mapping

import torch

from ._modules import dense_weight
from ._names import preview


def token_mask_of(batch):
    """The 2-D ``attention_mask`` of a dict batch, or of a dict inside a tuple
    batch (a sentence-transformers model is called as ``model(features)``)."""
    candidates = [batch] if isinstance(batch, Mapping) else (
        [b for b in batch if isinstance(b, Mapping)] if isinstance(batch, (tuple, list)) else [])
    for candidate in candidates:
        mask = candidate.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


def mask_for(t, mask):
    """The batch's (batch, tokens) ``mask`` laid out as ``t``'s leading dims,
    ``t`` being (batch, tokens, ...) or token-first (tokens, batch, ...) as
    torch's ``nn.Transformer`` layers take it; None when ``t`` is neither
    (a pooled output). A square batch (as many sequences as tokens) cannot
    tell the two apart and is read batch-first, as transformers models are."""
    if mask is None or t.dim() != mask.dim() + 1:
        return None
    if tuple(t.shape[:-1]) == tuple(mask.shape):
        return mask
    if tuple(t.shape[:-1]) == tuple(mask.T.shape):
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


def _run_batches(model, calibration, token_mask=None):
    """Run the calibration; ``token_mask[0]`` holds the running batch's attention_mask
    (:func:`token_mask_of`).

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
        mask = token_mask_of(batch)
        if token_mask is not None and mask is not None:
            token_mask[0] = mask
        try:
            call_with_batch(model, batch, "compress_model", "a calibration batch")
        finally:
            if token_mask is not None:
                token_mask[0] = None
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


def run_calibration(model, calibration, token_mask=None, allow_empty=False):
    """Run ``calibration`` on ``model`` in eval mode under no_grad, restoring the modes after.

    An exception from the calibration is re-raised as RuntimeError naming it;
    a calibration of the wrong kind is a TypeError. An empty iterable is a
    ValueError unless ``allow_empty`` (one rank's share of the data may be
    empty: the other ranks' shares calibrate the layers).

    Returns the number of batches run, None for a callable.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            count = _run_batches(model, calibration, token_mask)
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

    A layer the calibration never ran is a ValueError, or with
    ``allow_unseen`` (another rank's share of the data may reach it) None;
    with ``allow_unseen`` an empty calibration iterable is accepted too.

    When ``stages`` is a list, it receives the layer names in the order of
    their first call, grouped into lists of layers fed the same tensor.

    The hooks are removed whatever happens; see ``run_calibration``.
    """
    grams = {name: None for name in layers}
    # Layers fed the same tensor one after another (attention's q, k, v) share
    # one product: remember the last input and its XᵀX.
    last = {"key": None, "gram": None}
    # Padding tokens carry no meaning but would pull the whitening towards
    # their activations: rows of inputs shaped like the batch's attention_mask
    # where the mask is 0 are left out.
    token_mask = [None]

    def make_hook(name, k):
        def hook(module, args, kwargs):
            # nn.Linear calls its argument input, transformers' Conv1D x.
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if x.dim() == 0 or x.size(-1) != k:
                # A batch of the wrong width: record nothing, so that the
                # layer raises its own error naming the shapes it was given.
                return
            same = last["key"] is not None and _unchanged(last["key"], x)
            if stages is not None and grams[name] is None:
                if same and stages:
                    stages[-1].append(name)
                else:
                    stages.append([name])
            if not same:
                if x.is_nested:
                    # torch's TransformerEncoder packs a padded batch into a
                    # nested tensor in inference: its sequences, no padding.
                    x64 = torch.cat([seq.reshape(-1, k) for seq in x.detach().unbind()])
                else:
                    x64 = without_padding(x.detach(), token_mask[0]).reshape(-1, k)
                x64 = x64.to(torch.float64)
                last["key"], last["gram"] = _input_key(x), x64.T @ x64
            g = last["gram"]
            grams[name] = g.clone() if grams[name] is None else grams[name].add_(g)
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, dense_weight(module).shape[1]),
                                                with_kwargs=True)
               for name, module in layers.items()]
    try:
        run_calibration(model, calibration, token_mask, allow_empty=allow_unseen)
    finally:
        last.clear()
        for handle in handles:
            handle.remove()
    check_all_seen([name for name, g in grams.items() if g is None] if not allow_unseen else [])
    return grams


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
    zero = [name for name, gram in grams.items() if gram is not None and not bool(gram.any())]
    if zero:
        raise ValueError(
            f"compress_model: the calibration gave layer(s) {preview(zero)} only zero inputs "
            "(or only padding tokens), which say nothing about how to truncate them; give "
            "batches that reach them with real inputs, or exclude those layers")
