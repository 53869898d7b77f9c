"""How much each layer's truncation changes the model's output, measured on calibration data.

A layer's own relative output error says little about the damage to what the
model finally produces: on a sentence-embedding model, the same relative error
in an MLP's down-projection moves the embeddings a hundred times more than in
an attention projection. ``allocation="sensitivity"`` therefore probes: each
layer in turn is replaced by its truncation at the uniform rank, the
calibration runs, and the change of the model's outputs is measured. The
layer's sensitivity s = (relative squared change of the outputs) /
(the layer's relative squared output error at that rank) then weighs its
singular values in the rank allocation: the damage of rank r is modelled as
s · Σ_{i>r} σ_i² / Σ σ_i².

"The model's outputs" are those of the model's own forward when the
calibration calls it, otherwise those of its last top-level child to run
(e.g. when the calibration calls ``model.forward`` or a method like
``encode``). Every floating-point tensor in them counts, each relative to its
own size. Wide outputs (logits) are kept through a fixed random projection to
64 columns, which keeps squared distances in expectation at a bounded memory.
In a dict batch with an ``attention_mask`` of shape (batch, tokens), the rows
of per-token outputs (batch, tokens, ...) or (tokens, batch, ...) at padding
tokens are left out, as they are from the whitening statistics: what the
model computes there is no output anyone reads. So are the padding entries of
outputs of the mask's own shape, one number per token (a question-answering
head's ``start_logits``). The mask that applies to an
output is chosen as for those (``PaddingMasks``): an encoder-decoder model's
decoder outputs take the batch's ``decoder_attention_mask``, if any, and the
outputs of another tower (CLIP's vision model) none.
"""

import math

import torch

from .calibration import (PaddingMasks, eager_hook, floating_tensors, per_token_layout,
                          run_calibration, takes_hooks)

_KEPT_COLUMNS = 64
# The smallest relative squared output error of a probe that still measures
# something: below it the truncation reproduces the calibration up to rounding.
_MEASURABLE_TAIL = 1e-10


class _Projection:
    """Fixed random maps from n columns to ``_KEPT_COLUMNS``, one per width, seeded."""

    def __init__(self):
        self._maps = {}

    def __call__(self, t):
        if t.numel() == 0:
            return torch.zeros(0, 1)  # nothing to compare, but the slot stays in its place
        rows = t.detach().reshape(-1, t.shape[-1]) if t.dim() else t.detach().reshape(1, 1)
        # float32 is plenty for a relative change; float64 models keep theirs.
        rows = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
        n = rows.shape[1]
        if n <= _KEPT_COLUMNS:
            # A copy even where rows is the output itself: a model may hand out
            # a buffer that its next run overwrites.
            return rows.to("cpu", copy=True)
        if n not in self._maps:
            generator = torch.Generator().manual_seed(n)
            self._maps[n] = (torch.randn(n, _KEPT_COLUMNS, generator=generator,
                                         dtype=torch.float64) / _KEPT_COLUMNS ** 0.5)
        return (rows @ self._maps[n].to(device=rows.device, dtype=rows.dtype)).cpu()


class OutputRecorder:
    """The model's outputs over one calibration run, reduced as described above."""

    def __init__(self, model):
        self.model = model
        self.project = _Projection()
        self.masks = PaddingMasks(model)

    def record(self, calibration, allow_empty=False):
        """The outputs of each call; None for an empty calibration ``allow_empty`` accepts."""
        top, children = [], []
        order = list(self.model.named_children())

        def keep(store, label):
            def hook(module, args, output):
                store.append((label, [self.project(_real_tokens(t, self.masks.of(t, module)))
                                      for t in floating_tensors(output)]))
            return hook

        handles = []
        try:  # registered one at a time, so that every one made is removed
            handles.append(self.model.register_forward_hook(eager_hook(keep(top, None))))
            for name, child in order:
                if takes_hooks(child):  # a TorchScript part takes none
                    handles.append(child.register_forward_hook(eager_hook(keep(children, name))))
            with self.masks:
                count = run_calibration(self.model, calibration, self.masks, allow_empty)
        finally:
            for handle in handles:
                handle.remove()
        if count == 0:
            return None
        if top:
            outputs = [tensors for _, tensors in top]
        elif children:
            last = children[-1][0]
            outputs = [tensors for label, tensors in children if label == last]
        else:
            raise ValueError(
                "compress_model: allocation='sensitivity' needs a calibration that runs the "
                "model or its top-level modules; none of them ran")
        if not any(outputs):
            raise ValueError(
                "compress_model: allocation='sensitivity' found no floating-point tensor in the "
                "model's outputs (tensors, or tensors in dicts, tuples, lists and dataclasses) to "
                "measure")
        return outputs


def _real_tokens(t, mask):
    """An output's entries at real tokens (:func:`per_token_layout`), (n, ...),
    one number per token as a column; ``t`` as it is where the mask does not
    fit it."""
    layout = per_token_layout(t, mask)
    if layout is None:
        return t
    kept = t[layout.to(t.device) != 0]
    return kept if kept.dim() > 1 else kept.unsqueeze(-1)


def relative_change(reference, outputs):
    """Σ over output slots of ‖y' − y‖² / ‖y‖²; slots are the tensor positions per call."""
    if len(outputs) != len(reference) or any(
            len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b))
            for a, b in zip(outputs, reference)):
        raise ValueError(
            "compress_model: the calibration produced outputs of other shapes on a second run; "
            "allocation='sensitivity' needs a calibration that runs the same batches every "
            "time")
    slots = max((len(call) for call in reference), default=0)
    change = 0.0
    for slot in range(slots):
        err = ref = 0.0
        for mine, theirs in zip(outputs, reference):
            if slot < len(theirs):
                y = theirs[slot].double()
                err += float((mine[slot].double() - y).pow(2).sum())
                ref += float(y.pow(2).sum())
        change += err / ref if ref > 0 else 0.0
    return change


def measure_sensitivity(model, calibration, probes, swaps, allow_empty=False, ran=None):
    """{name: s} for the layers in ``probes`` ({name: (a function making the probe
    module, relative tail²)}); each probe is made when its turn comes.

    ``swaps`` (a :class:`~lowrank_ext._modules.Swaps` of ``model``) puts each
    probe in place of its layer and the original back (with the hooks the
    calibration left on the probe); a swap that does not finish is left to
    the caller's ``swaps.undo()``. With
    ``allow_empty`` (this rank's share of the data may be empty) an empty
    calibration measures nothing: every s is NaN. ``ran()``, where given, is
    called after each run of the calibration (one, then one per probe).
    """
    recorder = OutputRecorder(model)
    reference = recorder.record(calibration, allow_empty)
    if ran is not None:
        ran()
    if reference is None:
        if ran is not None:
            for _ in probes:  # no probe runs: their steps are done
                ran()
        return {name: math.nan for name in probes}
    # A change against Inf or NaN is NaN whatever the probe: every layer
    # would look unmeasured for the wrong reason.
    if not all(bool(torch.isfinite(t).all()) for call in reference for t in call):
        raise ValueError(
            "compress_model: allocation='sensitivity' found NaN or Inf in the model's outputs "
            "on the calibration (a float16 model overflowing?), so no layer's effect on them "
            "can be measured; give the model finite outputs (e.g. compress a float32 copy) or "
            "use allocation='global'")
    sensitivity = {}
    for name, (make, tail_squared) in probes.items():
        probe = make()
        calls, handle, mark = [], None, len(swaps.done)
        try:
            # Recorded before it is made, so that whatever stops it (an
            # interrupt too) leaves the original in its place, here or at
            # the caller's undo.
            swaps.swap(name, probe, warn=False)
            handle = probe.register_forward_pre_hook(lambda module, args: calls.append(1))
            change = relative_change(reference, recorder.record(calibration))
        finally:
            if handle is not None:
                handle.remove()
            swaps.put_back(keep=mark)
        del probe  # one probe at a time: made before the next one is
        if ran is not None:
            ran()
        if not calls:
            # This calibration never runs the layer (another rank's share of
            # the data does): no change says nothing about it.
            sensitivity[name] = math.nan
            continue
        # A probe exact on the calibration inputs (they span fewer directions
        # than its rank) measures rounding noise over about zero: NaN says
        # "not measured" (compress_model substitutes and warns).
        sensitivity[name] = change / tail_squared if tail_squared > _MEASURABLE_TAIL else math.nan
    return sensitivity
