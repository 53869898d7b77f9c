"""Refining a compressed model's factors end to end, with the original model as the teacher.

Truncation is optimal layer by layer, but the errors of many layers compound:
each layer sees inputs that earlier compressed layers have already moved.
``distill`` trains the factors (``A`` and ``B`` of every ``LowRankLinear``)
for a number of steps so that the compressed model's outputs, and optionally
the outputs of chosen inner modules (transformer blocks, say), match the
original model's on the same batches. Everything else stays frozen.

The loss is the sum, over every floating-point tensor compared, of its
relative squared error ‖s − t‖² / ‖t‖², so that tensors of different scales
count alike. For dict batches with an ``attention_mask``, padding positions of
per-token tensors ((batch, tokens, ...) or token-first) are left out,
with the mask that applies to each tensor as in the calibration
(``PaddingMasks``, judged on the teacher): an encoder-decoder model's decoder
tensors take the batch's ``decoder_attention_mask``, if any, and another
tower's (CLIP's vision model) none.
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._modules import compiled_original, encoder_flags_kept
from .calibration import (PaddingMasks, _cuda_devices, call_with_batch, copy_of_batch,
                          floating_tensors, per_token_layout, set_eval_flags, takes_hooks)
from .selection import name_matches
from ._names import preview


# Trained through float32 master copies (see distill).
_HALF = (torch.float16, torch.bfloat16)
# Loss scaling for float16 parameters, as torch.amp.GradScaler starts it; the
# scale doubles after this many steps without an overflow.
_FIRST_LOSS_SCALE = 2.0 ** 16
_LOSS_SCALE_GROWTH_STEPS = 100


@dataclass
class DistillResult:
    """What :func:`distill` did: the loss of every step and the wall time."""

    steps: int
    losses: list = field(repr=False)
    seconds: float

    @property
    def first_loss(self):
        return self.losses[0]

    @property
    def last_loss(self):
        """Mean loss over the last tenth of the steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)

    def __repr__(self):
        return (f"DistillResult(steps={self.steps}, first_loss={self.first_loss:.4g}, "
                f"last_loss={self.last_loss:.4g}, seconds={self.seconds:.1f})")


def _check_data_parallel(model, params):
    """Refuse a DistributedDataParallel wrapper made with other trainable
    parameters than those distill trains. It synchronizes the gradients of
    the parameters that required grad when it was made: one that distill
    unfreezes would train on each rank's data alone, and one that it freezes
    leaves the wrapper waiting for a gradient (its error at the next step,
    after a first step whose gradients no rank shared), unless it was made
    with find_unused_parameters or static_graph."""
    from torch.nn.parallel import DistributedDataParallel

    trained = {id(p) for p in params}
    for name, module in model.named_modules():
        if not isinstance(module, DistributedDataParallel):
            continue
        names = {id(p): n for n, p in module.module.named_parameters()}
        wrapped_trainable = {id(p) for p in module.module.parameters() if p.requires_grad}
        inside = trained & set(names)
        unfrozen = sorted(names[i] for i in inside - wrapped_trainable)
        frozen = sorted(names[i] for i in wrapped_trainable - inside)
        if frozen and (getattr(module, "find_unused_parameters", False)
                       or getattr(module, "static_graph", False)):
            frozen = []  # made to let parameters go without gradients
        differences = []
        if unfrozen:
            differences.append(f"it would train {preview(unfrozen)}, frozen when it was made")
        if frozen:
            differences.append(f"it would freeze {preview(frozen)}")
        if differences:
            where = "the model" if not name else repr(name)
            raise ValueError(
                f"distill: {where} is a DistributedDataParallel wrapper made with other "
                f"trainable parameters than distill trains ({'; '.join(differences)}): set "
                "requires_grad=False on every parameter but those distill trains before "
                "wrapping, so that the wrapper synchronizes exactly them")


def _check_arguments(model, teacher, steps, lr, warmup, max_grad_norm, loss, progress):
    if loss is not None and not callable(loss):
        raise TypeError(f"distill: loss must be callable fn(output, target), got "
                        f"{type(loss).__name__}")
    for name, value in (("model", model), ("teacher", teacher)):
        if not isinstance(value, torch.nn.Module):
            raise TypeError(f"distill: {name} must be an nn.Module, got {type(value).__name__}")
    if model is teacher:
        raise ValueError("distill: teacher is the model itself; pass the original, uncompressed "
                         "model (e.g. a copy.deepcopy taken before compress_model)")
    # numbers' ABCs: NumPy's scalars (np.int64(800), np.float32(5e-4)) are taken too.
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"distill: steps must be a positive int, got {steps!r}")
    for name, value in (("lr", lr), ("max_grad_norm", max_grad_norm)):
        if value is None and name == "max_grad_norm":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"distill: {name} must be a positive finite number, got {value!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Real) or not 0 <= warmup < 1:
        raise ValueError(f"distill: warmup must be a fraction of the steps in [0, 1), got "
                         f"{warmup!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"distill: progress must be True, False or None, got {progress!r}")


def _trainable(model, teacher, parameters):
    if parameters is None:
        from .lora import adapter_parameters
        from .lora_layer import LoRALinear
        from .nn import LowRankLinear

        # A model given LoRA adapters (say over its compressed layers) trains
        # them, not the factors add_lora froze.
        adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        merged = [n or "(the model)" for n, m in adapters.items() if m.merged]
        if merged:
            from ._names import preview

            # A merged layer computes base(x) alone: its A and B would train
            # without changing anything.
            raise ValueError(f"distill: LoRA layer(s) {preview(merged)} are merged, so their "
                             "adapters take no part in the outputs; unmerge() them first")
        params = (list(adapter_parameters(adapters).values()) if adapters else
                  [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.A, m.B)])
        if not params:
            raise ValueError("distill: the model has no LowRankLinear layers to refine (run "
                             "compress_model first, or pass parameters=)")
    else:
        if isinstance(parameters, torch.Tensor):
            raise TypeError("distill: parameters must be an iterable of parameters, got a "
                            "single tensor; wrap it in a list")
        params = list(parameters)
        if not params or not all(isinstance(p, torch.nn.Parameter) for p in params):
            raise TypeError("distill: parameters must be a non-empty iterable of nn.Parameter")
        own = {id(p) for p in model.parameters()}
        if not all(id(p) in own for p in params):
            raise ValueError("distill: every entry of parameters must be a parameter of model")
    params = list({id(p): p for p in params}.values())  # tied weights once
    for p in params:
        if not p.is_floating_point():
            raise TypeError(f"distill: cannot train a {p.dtype} parameter")
    teachers = {id(p) for p in teacher.parameters()}
    if any(id(p) in teachers for p in params):
        raise ValueError("distill: the teacher shares trainable parameters with the model; pass "
                         "a separate copy of the original model")
    return params


def _generator_states(devices, model):
    """The states of the CPU generator, of the CUDA ``devices``' and of any
    ``torch.Generator`` a module of ``model`` holds as an attribute."""
    own = {id(g): g for m in model.modules() for g in vars(m).values()
           if isinstance(g, torch.Generator)}
    return (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices],
            [(g, g.get_state()) for g in own.values()])


def _set_generator_states(devices, states):
    cpu, cuda, own = states
    torch.set_rng_state(cpu)
    for device, state in zip(devices, cuda):
        torch.cuda.set_rng_state(state, device)
    for generator, state in own:
        generator.set_state(state)


def _inside_wrappers(model):
    """The module that torch.compile and (Distributed)DataParallel wrappers wrap."""
    while True:
        inner = compiled_original(model)
        if isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = inner.module
        if inner is model:
            return model
        model = inner


def _matched_modules(model, teacher, match):
    """[(name, module of model, module of teacher)] for the ``match`` patterns."""
    if match is None:
        return []
    if isinstance(match, str):
        patterns = [match]
    else:
        try:
            patterns = list(match)
        except TypeError:
            patterns = None
    if patterns == []:
        raise ValueError("distill: match is an empty list; give module name patterns, or "
                         "None to match the outputs only")
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError("distill: match must be a module name pattern or a list of them")
    # A torch.compile'd model's own names carry an _orig_mod. prefix, and a
    # (Distributed)DataParallel one's a module. prefix: names are those of the
    # module inside, so that either side may be wrapped.
    model, teacher = _inside_wrappers(model), _inside_wrappers(teacher)
    names = [n for n, _ in model.named_modules() if n]
    teacher_modules = dict(teacher.named_modules())
    chosen = []
    for pattern in patterns:
        found = [n for n in names if name_matches(n, pattern)]
        if not found:
            raise ValueError(f"distill: match pattern {pattern!r} matches no module of the model "
                             f"(candidates: {preview(names)})")
        chosen += [n for n in found if n not in chosen]
    missing = [n for n in chosen if n not in teacher_modules]
    if missing:
        raise ValueError(f"distill: the teacher has no module named {missing[0]!r}; match names "
                         "modules present in both models")
    found = [(n, model.get_submodule(n), teacher_modules[n]) for n in chosen]
    scripted = [n for n, mine, theirs in found if not (takes_hooks(mine) and takes_hooks(theirs))]
    if scripted:
        raise ValueError(f"distill: match names TorchScript module(s) {preview(scripted)}, whose "
                         "outputs cannot be captured (torch takes no hooks on them); match the "
                         "modules around them")
    return found


def _batches(data):
    """Endless batches from a re-iterable ``data`` (a list, a DataLoader)."""
    if isinstance(data, (torch.Tensor, Mapping, tuple)):
        raise TypeError(f"distill: data must be an iterable of batches, got a single "
                        f"{type(data).__name__}; wrap it in a list")
    try:
        first = iter(data)
    except TypeError:
        raise TypeError(f"distill: data must be an iterable of batches, got "
                        f"{type(data).__name__}") from None
    if first is data:
        # A generator, say: one pass would exhaust it. (A loader whose
        # __iter__ rewinds itself and returns itself cannot be told apart.)
        raise TypeError(f"distill: data must be re-iterable (a list of batches or a DataLoader), "
                        f"got a {type(data).__name__} whose iter() returns itself, an iterator "
                        "that one pass exhausts; give an object whose __iter__ returns a new "
                        "iterator each time")
    it, passes, total = first, 0, 0
    while True:
        empty = True
        for batch in it:
            empty = False
            total += 1
            yield batch
        if empty:
            if passes == 0:
                raise ValueError("distill: data has no batches")
            # A DataLoader over a one-shot IterableDataset, say: it cannot be cycled.
            raise ValueError(
                f"distill: data gave no batches on pass {passes + 1}, after {total} in the "
                "passes before; it must give its batches again each time it is iterated")
        passes += 1
        it = iter(data)


def relative_error(student, teacher, mask=None):
    """‖s − t‖² / ‖t‖² in float32 or better, over the positions ``mask`` keeps
    (:func:`per_token_layout`; the others are left out, not weighted by zero,
    so that what padding holds, -inf scores say, never enters the sums)."""
    dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    s, t = student.to(dtype), teacher.to(device=student.device, dtype=dtype)
    kept = _kept(t, mask)
    if kept is not None:
        s, t = s[kept], t[kept]
    num, den = ((s - t) ** 2).sum(), (t ** 2).sum()
    return num / den.clamp_min(torch.finfo(dtype).tiny)


def _non_finite_loss(step, value, batch, target, pairs, custom_loss):
    """Why the loss came out ``value`` (not finite) at ``step``, as far as can
    be told: values in the batch, or in the teacher's outputs where the loss
    reads them (``pairs``' masks; a custom loss may read any), or, after an
    update, the update itself. Values that are not finite on purpose (-inf in
    an additive mask) gave a finite loss before; from the second step on they
    are named beside the lr, not instead of it."""
    batch_bad = not all(bool(torch.isfinite(t).all()) for t in floating_tensors(batch))
    read = [(t, mask) for _, t, mask in pairs] + (
        [(t, None) for t in floating_tensors(target)] if custom_loss else [])
    teacher_bad = any(_not_finite_where_kept(t, mask) for t, mask in read)
    cause = ("this batch holds values that are not finite" if batch_bad else
             "the teacher's outputs on this batch hold values that are not finite where the "
             "loss reads them" if teacher_bad else None)
    if step == 0:  # no update yet: the lr has nothing to do with it
        return cause or (f"the loss is {value} before any update: the model, the teacher or "
                         "the batch gives values that are not finite")
    if cause:
        return (f"the loss is {value}: {cause}, or, if they are meant (an additive -inf "
                "mask, say), the last update diverged: try a lower lr")
    return f"the loss is {value}; try a lower lr"


def _kept(tensor, mask):
    """The positions of ``tensor`` a loss over ``mask`` keeps (a boolean
    index, :func:`per_token_layout`'s), or None for all of them."""
    layout = per_token_layout(tensor, mask)
    return None if layout is None else layout.to(tensor.device) != 0


def _not_finite_where_kept(tensor, mask):
    """Whether ``tensor`` holds values that are not finite at the positions
    :func:`relative_error` keeps for ``mask``."""
    kept = _kept(tensor, mask)
    return not bool(torch.isfinite(tensor if kept is None else tensor[kept]).all())


def _not_finite_beyond_teacher(outputs, targets):
    """Whether the model's outputs hold values that are not finite where the
    teacher's outputs are finite (a head may give -inf at padding on purpose);
    where the two do not pair up, whether any is not finite."""
    outs, tgts = floating_tensors(outputs), floating_tensors(targets)
    if len(outs) != len(tgts) or any(o.shape != t.shape for o, t in zip(outs, tgts)):
        return not all(bool(torch.isfinite(o).all()) for o in outs)
    return any(bool((~torch.isfinite(o) & torch.isfinite(t.to(o.device))).any())
               for o, t in zip(outs, tgts))


def _pairs(label, student, teacher):
    s, t = floating_tensors(student), floating_tensors(teacher)
    if len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise ValueError(
            f"distill: {label} of the model and of the teacher differ: "
            f"{[tuple(a.shape) for a in s]} against {[tuple(b.shape) for b in t]}")
    return list(zip(s, t))


def distill(model: nn.Module, teacher: nn.Module, data: Iterable, *, steps: int,
            lr: float = 1e-4, match: str | Sequence[str] | None = None,
            loss: Callable | None = None, parameters: Iterable | None = None,
            warmup: float = 0.05, max_grad_norm: float | None = None,
            progress: bool | None = None) -> DistillResult:
    """Train ``model``'s low-rank factors so that its outputs match ``teacher``'s on ``data``.

    Args:
        model: the compressed model, refined in place.
        teacher: the original model (e.g. ``copy.deepcopy(model)`` taken before
            :func:`compress_model`); run under ``no_grad`` and never changed.
        data: a re-iterable of batches (a list, a DataLoader), called like the
            calibration: tensor → ``model(x)``, tuple → ``model(*b)``,
            dict → ``model(**b)``. Cycled until ``steps`` batches have run.
        steps: optimizer steps, one batch each.
        lr: Adam's learning rate, reached after ``warmup·steps`` linear
            warm-up steps (rounded, halves up; at least one, and from 3 steps at most
            ``steps - 2`` so that the last step is below the peak) and then
            lowered on a cosine to zero.
        warmup: the fraction of ``steps`` spent warming up, in [0, 1).
        match: module name patterns (as ``include`` of :func:`compress_model`)
            whose outputs are matched too, besides the model's outputs; inner
            targets such as transformer blocks guide the factors far better
            than the final output alone.
        loss: ``fn(output, target) -> scalar tensor`` for the model's outputs,
            in place of their summed relative squared errors (the matched
            modules keep theirs): e.g. a cosine loss on sentence embeddings.
        parameters: what to train; default the ``A`` and ``B`` of every
            ``LowRankLinear`` in ``model``, or, when it holds LoRA adapters
            (:func:`add_lora`, e.g. on a compressed model), those of every
            adapter (with DoRA's magnitudes).
        max_grad_norm: clip the gradients' total norm to this, if given.
        progress: show a tqdm bar; ``None`` shows it on a terminal only.

    float16 and bfloat16 parameters train through float32 master copies (the
    optimizer and the clipping act on those, and the parameters take their
    rounded values after each step), so that Adam's eps, 0 in float16, and
    updates below bfloat16's precision are not lost. With float16 parameters
    the loss is scaled as torch.amp.GradScaler does it (from 2¹⁶; where the
    scaled gradients overflow, the step runs again unscaled and the scale is
    halved; it doubles after 100 steps without), so that gradients below
    float16's smallest values (about 6e-8, reached once the loss is small)
    are not lost to 0. Gradient hooks, and other tensors the loss reaches,
    see the scaled gradients, as with GradScaler. Not inside a
    DistributedDataParallel wrapper, which synchronizes every backward.

    Both models run in eval mode (no dropout) and get their modes back after;
    the parameters' ``requires_grad`` flags and gradients are restored too.
    If anything fails, the trained parameters are put back as they were and
    the error is re-raised (as RuntimeError naming the step, unless it is one
    of ``distill``'s own argument errors). Returns a :class:`DistillResult`.
    """
    _check_arguments(model, teacher, steps, lr, warmup, max_grad_norm, loss, progress)
    steps, lr, warmup = int(steps), float(lr), float(warmup)
    max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("distill: cannot train under torch.inference_mode(), whose tensors "
                           "take no gradients; call it outside that block")
    params = _trainable(model, teacher, parameters)
    _check_data_parallel(model, params)
    inner = _matched_modules(model, teacher, match)
    batches = _batches(data)

    from tqdm.auto import tqdm

    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in itertools.chain(model.modules(), teacher.modules())}
    devices = sorted(set(_cuda_devices(model)) | set(_cuda_devices(teacher)))
    captured = {"student": [], "teacher": []}
    # Which padding mask applies to each tensor compared is judged on the
    # teacher, at the module that gave it (inside the encoder, say).
    padding = PaddingMasks(teacher)

    # Which model is running: a module both models share (a frozen head, say)
    # carries both hooks, and each must record its own model's forward only.
    running = [None]

    def keep(store, name, padding=None):
        def hook(module, args, output):
            if running[0] is store:
                store.append((name, output, None if padding is None else
                              [padding.of(t, module) for t in floating_tensors(output)]))
        return hook

    handles = []
    losses = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="distill", unit="step", leave=False,
               disable=None if progress is None else not progress)
    step = 0
    # A training loop: gradients are needed whatever the caller's grad mode
    # (inference_mode, which cannot be left here, was refused above).
    # Both models on torch's ordinary encoder path: in the teacher's no_grad
    # forward an encoder would pack a padded batch into a nested tensor and
    # give zeros at padded positions, which the student, computing gradients,
    # never does (a loss that no training removes where those count).
    with torch.enable_grad(), padding, encoder_flags_kept(teacher), encoder_flags_kept(model):
        try:
            for name, mine, theirs in inner:  # in the try: the finally removes every one
                handles.append(mine.register_forward_hook(keep(captured["student"], name)))
                handles.append(theirs.register_forward_hook(keep(captured["teacher"], name,
                                                                 padding)))
            set_eval_flags(modes)  # not .eval(): see set_eval_flags
            # (Set, not requires_grad_(): an uninitialized LazyLinear's
            # parameters refuse the method.)
            for p in model.parameters():
                p.requires_grad = False
            for p in params:
                p.requires_grad = True
                p.grad = None
            # Adam runs on float32 master copies of half-precision parameters:
            # its eps (1e-8) is 0 in float16, so a zero gradient would give 0/0,
            # and bfloat16 rounds away updates below its 8 bits of precision. The
            # parameters get the masters' values, rounded, after every step.
            masters = [p.detach().float() if p.dtype in _HALF else None for p in params]
            trained = [p if m is None else m for p, m in zip(params, masters)]
            optimizer = torch.optim.Adam(trained, lr=lr)
            # The cosine's first step is still at the peak, so two steps are left
            # to it: warmup near 1, rounded up to every step, never lowered the rate.
            # Halves up, as documented: rounded to 9 places first, so that
            # 0.29 · 50, 14.499999999999998 in binary, counts as 14.5.
            warm = max(1, min(steps - 2, math.floor(round(warmup * steps, 9) + 0.5)))

            def factor(i):  # linear warm-up, then a cosine to zero
                if i < warm:
                    return (i + 1) / warm
                return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

            def student_loss(step, batch, target, target_masks):
                """The model's forward on this step's batch, and the loss against the teacher's."""
                captured["student"].clear()
                running[0] = captured["student"]
                try:
                    output = call_with_batch(model, copy_of_batch(batch), "distill")
                finally:
                    running[0] = None
                terms = []
                if loss is None:
                    pairs = [(*pair, mask) for pair, mask in
                             zip(_pairs("the outputs", output, target), target_masks)]
                else:
                    pairs = []
                    terms.append(loss(output, target))
                    value = terms[0]
                    if not (isinstance(value, torch.Tensor) and value.numel() == 1
                            and value.requires_grad):
                        seen = (type(value).__name__ if not isinstance(value, torch.Tensor)
                                else f"a tensor of shape {tuple(value.shape)}"
                                if value.numel() != 1 else "a tensor that requires no grad")
                        raise ValueError(
                            "distill: loss must return a one-element tensor that depends on the "
                            f"model's output, got {seen}")
                if step == 0:
                    ran = {c[0] for c in captured["teacher"]}
                    idle = [name for name, _, _ in inner if name not in ran]
                    if idle:
                        raise ValueError(
                            f"distill: match names modules that did not run in the teacher's "
                            f"forward: {preview(idle)}; their outputs cannot be matched")
                if [c[0] for c in captured["student"]] != [c[0] for c in captured["teacher"]]:
                    raise ValueError("distill: the matched modules ran in a different order or "
                                     "number of times in the model and in the teacher")
                for (name, s, _), (_, t, t_masks) in zip(captured["student"],
                                                         captured["teacher"]):
                    pairs += [(*pair, mask) for pair, mask in
                              zip(_pairs(f"the outputs of {name!r}", s, t), t_masks)]
                if not pairs and not terms:
                    raise ValueError("distill: the outputs hold no floating-point tensor to match")
                total = sum(terms + [relative_error(s, t.detach(), mask)
                                     for s, t, mask in pairs]).reshape(())
                if not torch.isfinite(total):
                    raise FloatingPointError(_non_finite_loss(
                        step, total.item(), batch, target, pairs, loss is not None))
                return total

            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            # float16 gradients below 6e-8 are 0: the loss is scaled up before
            # the backward and the gradients down after it, in float32 (where
            # the scaled ones overflow, the step runs again unscaled and the
            # scale is halved; it doubles after a run of steps without).
            # (Not inside a DistributedDataParallel wrapper, which takes one
            # backward per forward.)
            scaling = any(p.dtype == torch.float16 for p in params) and not any(
                isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules())
            loss_scale, steps_since_overflow = (_FIRST_LOSS_SCALE if scaling else 1.0), 0
            for step in range(steps):
                batch = next(batches)
                for store in captured.values():
                    store.clear()
                padding.start(batch)
                # Each model gets its own copy of the batch (a forward that
                # changes its input in place changes neither the other model's
                # nor the caller's), and the teacher the random numbers the
                # model draws next (noise in a forward would be a loss that no
                # training removes): the generators advance as for the model alone.
                running[0] = captured["teacher"]
                with torch.no_grad(), torch.random.fork_rng(devices=devices):
                    target = call_with_batch(teacher, copy_of_batch(batch), "distill")
                target_masks = [padding.of(t, teacher) for t in floating_tensors(target)]
                padding.stop()
                # The model's generators as the teacher's forward found them:
                # a step run again unscaled draws the same numbers.
                before_forward = _generator_states(devices, model)
                total = student_loss(step, batch, target, target_masks)
                scale, overflowed = loss_scale, False
                while True:
                    optimizer.zero_grad(set_to_none=True)
                    for p in params:  # a half parameter's master, not itself, is the optimizer's
                        p.grad = None
                    (total * scale if scale != 1.0 else total).backward()
                    if step == 0 and all(p.grad is None for p in params):
                        raise ValueError(
                            "distill: the loss does not depend on the parameters being "
                            "trained (no gradient reached any of them); it must depend on the "
                            "model's output")
                    for p, master in zip(params, masters):
                        if master is not None:
                            master.grad = None if p.grad is None else p.grad.float()
                    if scale != 1.0:
                        for p in trained:
                            if p.grad is not None:
                                p.grad.div_(scale)
                    # Adam would turn gradients that are not finite into NaN
                    # parameters, which the next step would then blame. (One
                    # reduction: the largest |g| is NaN or inf where any is.)
                    new_grads = [p.grad for p in trained if p.grad is not None]
                    finite = not new_grads or bool(torch.isfinite(
                        torch.nn.utils.get_total_norm(new_grads, norm_type=math.inf)))
                    if finite or scale == 1.0:
                        break
                    # The scaled gradients overflowed: this step again, unscaled
                    # (a forward and a backward more; no graph is kept for it,
                    # which compiled backwards refuse), and half the scale from
                    # the next step on. Gradients that are not finite unscaled
                    # are refused below.
                    loss_scale, steps_since_overflow, scale = max(1.0, loss_scale / 2), 0, 1.0
                    overflowed, total = True, None
                    _set_generator_states(devices, before_forward)
                    total = student_loss(step, batch, target, target_masks)
                if scaling and finite and not overflowed:
                    steps_since_overflow += 1
                    if steps_since_overflow == _LOSS_SCALE_GROWTH_STEPS:
                        loss_scale, steps_since_overflow = loss_scale * 2, 0
                if not finite:
                    if any(p.dtype == torch.float16 and m is not None and m.grad is not None
                           and bool(m.grad.isinf().any()) for p, m in zip(params, masters)):
                        raise FloatingPointError(
                            "the gradients of float16 parameters are not finite (float16 holds "
                            "no more than 65504); distill a float32 copy of the model and "
                            "convert it back")
                    raise FloatingPointError(
                        "the gradients of the trained parameters are not finite although the "
                        "loss is: a value that is not finite in the forward (-inf at padding "
                        "that a trained layer reads, say) reaches them even where the loss "
                        "leaves it out")
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for p, master in zip(params, masters):
                        if master is not None:
                            p.copy_(master)
                losses.append(total.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            # Each step's loss checks the update before it, but none follows
            # the last one: the model's outputs on the last batch check it.
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                final = call_with_batch(model, copy_of_batch(batch), "distill")
            if _not_finite_beyond_teacher(final, target):
                raise FloatingPointError("the last update made the model's outputs not "
                                         "finite; try a lower lr")
        except BaseException as exc:
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)
            if isinstance(exc, (TypeError, ValueError)) and str(exc).startswith("distill:"):
                raise
            if isinstance(exc, Exception):
                raise RuntimeError(f"distill: step {step} raised {type(exc).__name__}: {exc}; the "
                                   "model's parameters are as they were") from exc
            raise
        finally:
            bar.close()
            for handle in handles:
                handle.remove()
            for store in captured.values():
                store.clear()
            for p, grad in zip(params, grads):
                p.grad = grad
            for p, flag in flags.items():
                p.requires_grad = flag
            for module, mode in modes.items():
                module.training = mode
    return DistillResult(steps=steps, losses=losses, seconds=time.perf_counter() - start)
