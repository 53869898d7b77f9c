"""Whole-model compression: replace ``nn.Linear`` layers by ``LowRankLinear``.

Without calibration each weight is truncated by plain SVD (the best rank-r
approximation in weight space). With calibration the truncation is
activation-aware, as in SVD-LLM: it minimises the output error
‖(W − B·A)·Xᵀ‖_F over the calibration inputs X of the layer. With
G = XᵀX = R·Rᵀ (accumulated in float64) that error is ‖(W − B·A)·R‖_F, so the
best rank-r map is the projection ``U_r·U_rᵀ·W`` onto the leading left singular
vectors of W·R. We take R = Q·√Λ from the eigendecomposition of G: unlike a
Cholesky factor it exists when G is singular (fewer samples than features,
dead inputs), and the result never needs R⁻¹, so no damping is needed.

With ``ratio``, ranks are allocated across layers under one total parameter
budget: each further rank of a layer costs d + k parameters and removes
σ_i² / ‖W·R‖² of that layer's relative squared output error, and the budget
goes greedily to the largest removal per parameter (``allocation="global"``),
or to the largest removal weighted by the layer's measured sensitivity, the
change of the model's outputs per unit of that error
(``allocation="sensitivity"``, the default with calibration; see
``sensitivity.py``). ``allocation="uniform"`` keeps the same ratio in every
layer instead.

Every factor is computed before any module is swapped, and a failure while
swapping (an interrupt too) puts back the layers already swapped, so a failure
leaves the model exactly as it was (but for what its own forward writes into
its buffers while calibrating).

The pieces live beside this file: ``selection.py`` (which layers),
``spectra.py`` (each layer's spectrum and factors), ``rank_choice.py`` (the
targets and the allocation), ``calibration.py`` and ``sensitivity.py``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ._checks import SUPPORTED_DTYPES, check_device, dtype_name
from ._modules import (Swaps, dense_weight, is_conv1d, is_sharded, keeps_encoder_flags,
                       model_tensors, places_of, plain_attributes, refuse_distributed_wrapper,
                       storage_of)
from ._names import preview
from ._workers import Workers
from .calibration import (check_all_seen, check_inputs_not_all_zero, collect_input_grams,
                          replayable, same_random_numbers)
from .sensitivity import measure_sensitivity
from .nn import LowRankLinear, break_even_rank, inherit_requires_grad, rank_for_ratio
from .rank_choice import (allocate_ranks, check_blocks_fit, check_targets, rank_from_target,
                          round_rank)
from .report import CompressionReport, LayerReport
from .selection import as_patterns, left_alone_suffix, name_matches, plain_linears, select_layers
from .spectra import SharedSpectrum, Spectrum, factor_errors, row_blocks


# --- per-layer work, shared over ranks ---------------------------------------------
def _check_finite_inputs(grams):
    """A ValueError naming the layers whose calibration inputs were not all finite.

    NaN or Inf in a layer's inputs (or values whose squares overflow float64)
    make XᵀX non-finite, and no truncation can be chosen from it. Every rank
    holds the summed matrices, so all raise alike.
    """
    # By blocks of rows: isfinite on a whole k×k Gram takes several of its size.
    bad = [name for name, gram in grams.items()
           if not all(bool(torch.isfinite(gram[rows]).all()) for rows in row_blocks(*gram.shape))]
    if bad:
        raise ValueError(
            f"compress_model: the calibration gave layer(s) {preview(bad)} inputs with NaN or "
            "Inf (or values so large that XᵀX overflows float64); check the calibration data")


def _spectra(names, layers, grams, owners, workers, device, keep=None, bar=None):
    """{name: spectrum} on every rank; each rank decomposes only the layers it owns.

    ``keep(name, spectrum)``, where given, is the rank that layer's factors
    will take (0 for a layer left dense): its spectrum keeps only the columns
    of U those need, so that they are not held at their widest for every
    layer at once. ``bar`` counts the layers decomposed.
    """
    spectra, error = {}, None
    try:
        for name in names:
            if owners[name] == workers.rank:
                spectrum = Spectrum(dense_weight(layers[name]), grams.get(name), device)
                if keep is not None:
                    spectrum.trim(keep(name, spectrum))
                spectra[name] = spectrum
            if bar is not None:
                bar.update(1)
    except Exception as exc:  # every rank must learn of it, or the others would wait
        error = exc
    workers.all_succeeded(error)
    if workers.shared:
        for name in names:
            size = min(layers[name].weight.shape)
            energy = workers.share(owners[name], getattr(spectra.get(name), "energy", None),
                                   (size,))
            if name not in spectra:
                spectra[name] = SharedSpectrum(energy)
    return spectra


def _factors(names, spectra, ranks, owners, workers, shapes, layers, bar=None):
    """{name: (B, A, weight error, output error)} on every rank, for the layers given.

    The factors come in the layer's dtype, on its device, and the errors are
    those of these rounded factors, the ones the model will hold: in bfloat16
    the rounding can outweigh the truncation itself. Each spectrum lets go of
    U and its Gram once its factors are made. ``bar`` counts the layers.
    """
    local, error = {}, None
    try:
        for name in names:
            if owners[name] == workers.rank:
                spectrum = spectra[name]
                W = spectrum.weight  # converted once, for A and for the errors
                B, A = spectrum.stored_factors(ranks[name], W)
                if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                    raise ValueError(
                        f"compress_model: the rank-{ranks[name]} factors of layer {name!r} "
                        f"exceed the range of {dtype_name(spectrum.dtype)}; compress a "
                        "float32 copy of the model")
                weight_error, output_error = factor_errors(spectrum, W, B, A)
                del W
                spectrum.forget()
                home = layers[name].weight.device
                local[name] = (B.to(home), A.to(home), weight_error, output_error)
            if bar is not None:
                bar.update(1)
    except Exception as exc:
        error = exc
    workers.all_succeeded(error)
    if not workers.shared:
        return local
    shared = {}
    for name in names:
        (d, k), r, owner = shapes[name], ranks[name], owners[name]
        weight = layers[name].weight
        mine = local.pop(name, None)
        # Sent in float64, which holds the rounded values exactly.
        B, A = (workers.share(owner, mine and mine[i], shape).to(device=weight.device,
                                                                  dtype=weight.dtype)
                for i, shape in ((0, (d, r)), (1, (r, k))))
        errors = workers.share(owner, mine and torch.tensor(
            [mine[2], math.nan if mine[3] is None else mine[3]], dtype=torch.float64), (2,))
        output_error = float(errors[1])
        shared[name] = (B, A, float(errors[0]), None if math.isnan(output_error)
                        else output_error)
    return shared


# --- the entry point ---------------------------------------------------------------
@keeps_encoder_flags
@same_random_numbers
def compress_model(model: nn.Module, *, ratio: float | None = None, rank: int | None = None,
                   energy: float | None = None, tol: float | None = None,
                   calibration: Callable[[nn.Module], object] | Iterable | None = None,
                   include: str | Sequence[str] | None = None,
                   exclude: str | Sequence[str] | None = None, allocation: str | None = None,
                   sequential: bool = False, rank_multiple: int = 1,
                   device: torch.device | str | int | None = None,
                   process_group: object = None,
                   progress: bool | None = None) -> CompressionReport:
    """Replace the model's ``nn.Linear`` layers by ``LowRankLinear``, in place.

    transformers' ``Conv1D`` layers (GPT-2 and its relatives: a linear layer
    with its weight stored transposed) count as linear layers too.

    Args:
        model: any ``nn.Module``.
        ratio: the fraction of the selected layers' weight parameters kept, in (0, 1].
        rank: the same rank for every layer.
        energy: per layer, the smallest rank keeping this fraction of Σσ² (of
            W, or of W·R with calibration), in (0, 1].
        tol: per layer, the smallest rank with relative error ≤ tol (in weight
            space, or in output space with calibration).
        calibration: ``fn(model)`` running forward passes, or an iterable of
            batches (tensor → ``model(x)``, tuple → ``model(*b)``, dict →
            ``model(**b)``). Makes the truncation activation-aware. A dict
            batch with an ``attention_mask`` of shape (batch, tokens) leaves
            the padding tokens out of the statistics and out of the outputs
            the sensitivity allocation compares. ``allocation=
            "sensitivity"`` and ``sequential`` run the calibration several
            times and compare the runs, so an iterable is read once and its
            batches kept (a generator or a shuffled ``DataLoader`` gives every
            run the same batches); a callable must run the same batches
            each time it is called.
        include, exclude: glob patterns (or lists) on module names, matched in
            full or as a dotted suffix (a pattern equal to a name matches it,
            glob characters and all); each must match some Linear layer. A
            layer the model holds under several names is matched by each of
            them: any name matching ``include`` selects it, any matching
            ``exclude`` leaves it out.
        allocation: with ``ratio``, how the parameter budget is shared out.
            ``"sensitivity"`` (the default with calibration) probes each layer:
            it measures how much truncating that layer alone changes the
            model's outputs on the calibration data (one more calibration run
            per layer) and gives ranks where they save the most of that
            change per parameter; a layer may also be kept whole (dense)
            where its weights save more of it per parameter than further
            ranks would (near d·k/(d+k), the last ranks cost about as much
            as the whole weight). ``"global"`` (the default without
            calibration) gives them where they remove the most of each
            layer's own relative error; ``"uniform"`` keeps ``ratio`` in every
            layer. Given with ``rank``, ``energy`` or ``tol``, a ValueError.
        sequential: with calibration, whiten each layer with the inputs it sees
            once the layers before it are compressed (one more calibration
            run per group of layers fed the same tensor), so that later layers
            adapt to the error of earlier ones; ``energy`` and ``tol`` choose
            each layer's rank from those inputs. Slower; off by default.
        rank_multiple: every chosen rank is a multiple of this (or a layer's
            full rank min(d, k)), since kernels run the rank in blocks: on the
            CPU of ``benchmarks/RESULTS.md`` rank 65 costs 10 % more than 64,
            and GPU tensor cores take 16 at a time. ``ratio`` rounds down (the
            budget still holds), ``energy`` and ``tol`` round up (their
            guarantee still holds), and ``rank`` must be a multiple. A
            ``ratio`` too small to give every layer one block (rank 1 when
            this is 1) is an error, not a silently larger model (but
            ``allocation="uniform"`` gives a layer too small for its share,
            a two-class head, rank 1, a few parameters over).
        device: where the factorizations run, e.g. ``"cuda"`` for a model kept
            on the CPU. One layer at a time is moved there and its results
            come back, so the model never has to fit on ``device``. Default:
            each layer's own device.
        process_group: with ``torch.distributed`` initialized, the layers are
            shared out across the ranks of this group (default: the default
            group), factorized in parallel and the factors exchanged, so every
            rank ends with the same compressed model. Every rank must make the
            same call on the same model; calibration statistics are summed
            over the ranks, so each rank may calibrate on its own shard.
        progress: show a tqdm bar over the steps (decompositions, sensitivity probes,
            factors); ``None`` shows it on a terminal only.

    Exactly one of ratio, rank, energy, tol. Layers where factorizing saves
    nothing (rank ≥ d·k/(d+k)) stay dense and the report says so; so do
    layers whose weight is tied to another module (an output layer sharing the
    embedding matrix) or shares its storage with another of the model's
    tensors (halves of one fused parameter), whose bias another module
    shares, or that the model holds under two names: they take no part in
    the ratio's budget, as do layers with an empty weight (a dimension of 0).
    Subclasses of ``nn.Linear`` and parametrized layers (``weight_norm``,
    ``spectral_norm``, ...) are left alone, each with a note in the report;
    so are layers with a forward set on the instance (accelerate's hooks for
    ``device_map`` and offloading), and layers holding parameters, buffers or
    submodules besides their weight and bias, which a LowRankLinear would
    lose; an ``include`` pattern matching only such layers is a TypeError.
    Plain Python attributes set on a replaced layer are not carried over; the
    report's note for the layer names them.

    Returns:
        CompressionReport: per layer the rank, parameters and relative errors,
        the errors those of the factors as stored in the layer's dtype (a
        layer whose ``energy`` or ``tol`` only that rounding misses has a note
        saying so). A weight several reported layers share counts once.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"compress_model: model must be an nn.Module, got {type(model).__name__}")
    refuse_distributed_wrapper(model, "compress_model")
    if type(model) is nn.Linear:  # it cannot replace itself in place
        raise TypeError("compress_model: the model is itself an nn.Linear; use "
                        "LowRankLinear.from_linear(model, ...) instead")
    check_targets(rank, ratio, energy, tol, allocation)
    # Read once: a one-pass iterator (a map, a generator) would be empty the
    # second time the patterns are consulted.
    include = as_patterns("include", include)
    exclude = as_patterns("exclude", exclude)
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, numbers.Integral) \
            or rank_multiple < 1:
        raise ValueError(f"compress_model: rank_multiple must be a positive int, got "
                         f"{rank_multiple!r}")
    rank_multiple = int(rank_multiple)
    if progress is not None and not isinstance(progress, bool):  # "no" would show the bar
        raise TypeError(f"compress_model: progress must be True, False or None, got "
                        f"{progress!r}")
    if rank is not None and rank % rank_multiple:
        raise ValueError(f"compress_model: rank {rank} is not a multiple of rank_multiple "
                         f"{rank_multiple}")
    if allocation is None:
        allocation = "sensitivity" if calibration is not None else "global"
    elif allocation == "sensitivity" and calibration is None:
        raise ValueError("compress_model: allocation='sensitivity' needs calibration")
    # With a process group every rank runs this; whatever fails on one rank
    # (its model, its share of the calibration) is raised on all of them.
    workers = Workers(process_group)
    with workers.step("checking the model and the arguments"):
        device = check_device("compress_model", device, "holds no data to factorize on")
        # replacing: a LowRankLinear takes each layer's place, losing what it
        # holds besides its weight and bias (add_lora wraps them instead).
        linears = plain_linears(model, conv1d=True, replacing=True)
        if not linears:
            raise ValueError("compress_model: the model has no nn.Linear (or Conv1D) layer"
                             + left_alone_suffix(model, replacing=True))
        selected, left = select_layers(model, linears, include, exclude, replacing=True)
        if include is None:
            # Only the modules split_attention takes: it leaves subclasses alone.
            packed = [name for name, m in model.named_modules()
                      if type(m) is nn.MultiheadAttention
                      and not any(name_matches(name, p)
                                  for p in exclude or ())]
            if packed:
                warnings.warn(
                    f"compress_model: nn.MultiheadAttention module(s) {preview(packed)} keep "
                    "their projections packed, out of reach (torch never calls them as layers); "
                    "lx.split_attention(model) first makes them Linear layers to compress",
                    stacklevel=4)  # the caller's line, past the two decorators' wrappers
        # A weight tied to another module (an output layer sharing the embedding
        # matrix) or a layer reachable under two names cannot be replaced in one
        # place: the other holder keeps the dense tensor, so factorizing would add
        # parameters and untie what the model ties. Such layers stay dense.
        shared = _shared_layers(model, {name: linears[name] for name in selected})
        for name in selected:
            if name not in shared and linears[name].weight.numel() == 0:
                d, k = dense_weight(linears[name]).shape
                shared[name] = f"dense: an empty weight ({d}×{k}), nothing to factorize"
        names = [name for name in selected if name not in shared]
        layers = {name: linears[name] for name in names}
        shapes = {name: tuple(dense_weight(layer).shape) for name, layer in layers.items()}
        if ratio is not None:
            check_blocks_fit(shapes, ratio, rank_multiple, allocation)

        if not isinstance(sequential, bool):
            raise TypeError(f"compress_model: sequential must be a bool, got "
                            f"{type(sequential).__name__}")
        if sequential and calibration is None:
            raise ValueError("compress_model: sequential=True needs calibration")
        on_meta = [name for name, layer in layers.items() if layer.weight.is_meta]
        if on_meta:
            raise ValueError(
                f"compress_model: layer(s) {preview(on_meta)} are on the meta device: their "
                "weights hold no values to factorize; load the trained weights first "
                "(load_compressed fills a meta model from a compressed file)")
        # (float8 is floating point too, but LowRankLinear takes none of them.)
        not_real = {name: layer.weight.dtype for name, layer in layers.items()
                    if layer.weight.dtype not in SUPPORTED_DTYPES}
        if not_real:
            name, dtype = next(iter(not_real.items()))
            raise TypeError(
                f"compress_model: layer(s) {preview(list(not_real))} have {dtype_name(dtype)} "
                f"weights (layer {name!r}); only float32, float64, float16 and bfloat16 "
                "layers can be factorized: exclude them")
        sharded = [name for name, layer in layers.items() if is_sharded(layer.weight)]
        if sharded:
            raise ValueError(
                f"compress_model: layer(s) {preview(sharded)} hold sharded DTensors (FSDP2's "
                "fully_shard): each rank holds a shard only; compress the model before "
                "sharding it")
        for name, layer in layers.items():
            if not bool(torch.isfinite(layer.weight).all()):
                raise ValueError(f"compress_model: layer {name!r} has NaN or Inf in its weight")
        fingerprints = _fingerprints(layers) if workers.shared else None
        if sequential or (ratio is not None and allocation == "sensitivity"):
            # Several calibration runs are compared with each other: each must
            # see the same batches. Read only after every check that needs no
            # data, so that a refused call leaves a one-pass iterable unread.
            calibration = replayable(calibration)
        # The layers left alone are reported, dense, among the others.
        reported = _in_order(model, {*selected, *left})
        shared_records = _shared_records(
            reported, {**linears, **{n: m for n, (m, _) in left.items()}},
            {**shared, **{n: f"dense: left alone, {why}" for n, (_, why) in left.items()}})
    # Before returning for want of layers too: a rank with none would leave
    # the others waiting here.
    workers.check_same_call((list(shapes.items()), ratio, rank, energy, tol, allocation,
                             sequential, rank_multiple, calibration is not None))
    # Each rank factorizes its share of the layers from its own copy: ranks
    # holding other weights ended with other, mixed models, without a word.
    workers.check_same_call(
        fingerprints, "their layers' weights, biases or dtypes differ from rank 0's; every "
                      "rank must compress the same model (load the same weights first)",
        same=_same_fingerprints)
    if not layers:
        return CompressionReport([shared_records[n] for n in reported],
                                 calibrated=calibration is not None)
    owners = workers.assign(shapes)
    stages = []
    grams = {}
    if calibration is not None:
        with workers.step("the calibration"):
            grams = collect_input_grams(model, layers, calibration, stages,
                                        allow_unseen=workers.shared)
        grams = _summed_grams(grams, shapes, workers)
    _check_finite_inputs(grams)
    check_inputs_not_all_zero(grams)
    if sequential:
        workers.check_same_call(
            stages, "sequential=True needs every rank's share of the calibration to reach "
                    "every layer in the same order")

    calibrated = calibration is not None
    # With ``ratio`` shared out over the layers, the ranks come from every
    # layer's spectrum at once: with sequential=True too, from the first pass,
    # every layer still dense (the sensitivity probes measure that model).
    # Otherwise each layer's rank is known from the start (a uniform ratio,
    # rank=) or comes from its own spectrum (energy, tol): with
    # sequential=True, the spectrum of the inputs the stages before it give,
    # so that no first pass is decomposed.
    budgeted = ratio is not None and allocation != "uniform"
    probing = ratio is not None and allocation == "sensitivity"
    first_pass = budgeted or not sequential
    ranks = {}
    if ratio is not None and not budgeted:
        ranks = {n: round_rank(rank_for_ratio(*shapes[n], ratio), rank_multiple, *shapes[n])
                 for n in layers}
    elif rank is not None:
        ranks = {n: int(rank) for n in layers}

    def stays_dense(name):
        return ranks[name] >= break_even_rank(*shapes[name])

    def choose(name, spectrum):
        """The columns of U the layer's factors take, 0 where it stays dense; its
        rank is chosen here where its own spectrum decides it (energy, tol)."""
        if energy is not None or tol is not None:
            ranks[name] = round_rank(rank_from_target(spectrum, energy, tol), rank_multiple,
                                     *shapes[name], up=True)
        return 0 if stays_dense(name) else ranks[name]

    records, replacements, sensitivity = {}, {}, {}

    def dense(name):
        d, k = shapes[name]
        if budgeted and rank_multiple < break_even_rank(d, k) and ranks[name] == min(d, k):
            # (Grown rank by rank, a layer stops by ⌊d·k/(d+k)⌋ < min(d, k).)
            note = f"dense: kept whole by the {allocation} allocation ({d * k} weights)"
        else:
            note = (f"dense: rank {ranks[name]} >= d·k/(d+k) = {break_even_rank(d, k):.1f} "
                    "saves nothing")
        records[name] = LayerReport(name, (d, k), None, d * k, d * k, 0.0,
                                    0.0 if calibrated else None, note=note,
                                    sensitivity=sensitivity.get(name))

    def settle(names, spectra):
        """The layers of ``names`` to factorize, the others reported dense; each
        spectrum this rank holds keeps only what the layer's factors need."""
        factorized = []
        for name in names:
            r = choose(name, spectra[name])
            if owners[name] == workers.rank:
                spectra[name].trim(r)
            if r:
                factorized.append(name)
            else:
                dense(name)
        return factorized

    def replace(found, spectra):
        for name in list(found):
            # Popped: each layer's factors are let go once its module holds a copy.
            B, A, weight_error, output_error = found.pop(name)
            layer = layers[name]
            (d, k), r = shapes[name], ranks[name]
            new = _low_rank_like(layer, B, A)
            new.train(layer.training)
            replacements[name] = new
            note = rounding_note(layer.weight.dtype, spectra[name].relative_tail(r),
                                  weight_error if output_error is None else output_error,
                                  energy, tol)
            # Set by the model's code, they may mean anything (a cached copy of
            # the dense weight too): said, not carried over.
            attributes = plain_attributes(layer)
            if attributes:
                note = "; ".join(filter(None, (note, (
                    f"its attribute(s) {', '.join(attributes)} are not carried over to the "
                    "LowRankLinear"))))
            records[name] = LayerReport(name, (d, k), r, d * k, r * (d + k), weight_error,
                                        output_error, note=note,
                                        sensitivity=sensitivity.get(name))

    # The bar counts the first pass's decompositions, the sensitivity
    # probes' calibration runs (a reference, then one per probe this rank
    # runs) and the layers factorized (with sequential=True, a stage at a time).
    # A layer that no rank saves anything on (a one-output head) stays dense
    # whatever its sensitivity: it is not probed, and reports none.
    probed_names = [n for n in names if break_even_rank(*shapes[n]) > 1] if probing else []
    probed = sum(owners[n] == workers.rank for n in probed_names)
    bar = tqdm(total=(len(layers) if first_pass else 0) + (probed + 1 if probed else 0)
               + len(layers), desc="compress", unit="step", leave=False,
               disable=None if progress is None else not progress)
    # Any failure (an interrupt too, also one between two swaps) puts the
    # originals back.
    swaps = Swaps(model)
    try:
        spectra = {}
        if first_pass:
            # Where each layer's rank is known as its spectrum is, U is cut to
            # it at once, not held at its widest for every layer.
            spectra = _spectra(names, layers, grams, owners, workers, device,
                               None if budgeted else choose, bar)
            grams = {}  # each spectrum holds its own Gram, let go with its factors
        if probing:
            sensitivity = _sensitivities(model, calibration, probed_names, layers, spectra,
                                         shapes, ratio, owners, workers, swaps, bar)
        if budgeted:
            ranks = allocate_ranks(spectra, shapes, ratio, sensitivity if probing else None,
                                   rank_multiple, whole_layers=probing)
        if not sequential:
            factorized = settle(names, spectra)
            bar.update(len(names) - len(factorized))
            replace(_factors(factorized, spectra, ranks, owners, workers, shapes, layers, bar),
                    spectra)
            # Every factor exists: only now touch the model.
            for name, new in replacements.items():
                swaps.swap(name, new)
        else:
            # Only the first stage's inputs are those of the first pass; the
            # later stages gather their own.
            first = {n: spectra[n] for n in stages[0] if n in spectra}
            grams = {n: grams[n] for n in stages[0] if n in grams}
            spectra = None
            # Earlier stages go into the model as they are done, so that the
            # next calibration run sees their error.
            for index, group in enumerate(stages):
                # A layer whose rank is known already is left out where it stays
                # dense; one whose own spectrum chooses its rank is decomposed.
                stage = [n for n in group if n not in ranks or not stays_dense(n)]
                for name in group:
                    if name not in stage:
                        dense(name)
                if not stage:
                    bar.update(len(group))
                    continue
                bar.set_postfix_str(stage[0], refresh=False)
                if index == 0 and first_pass:
                    stage_spectra = first
                else:
                    if index == 0:
                        stage_grams = grams
                    else:
                        with workers.step("the calibration"):
                            stage_grams = collect_input_grams(
                                model, {n: layers[n] for n in stage}, calibration,
                                allow_unseen=workers.shared)
                        stage_grams = _summed_grams(stage_grams, shapes, workers)
                        _check_finite_inputs(stage_grams)
                        check_inputs_not_all_zero(stage_grams)
                    stage_spectra = _spectra(stage, layers, stage_grams, owners, workers,
                                             device, choose)
                    stage_grams = None  # each spectrum holds its own Gram
                first = grams = None
                factorized = settle(stage, stage_spectra)
                replace(_factors(factorized, stage_spectra, ranks, owners, workers, shapes,
                                 layers), stage_spectra)
                for name in factorized:
                    swaps.swap(name, replacements[name])
                bar.update(len(group))
    except BaseException:
        swaps.undo()
        raise
    finally:
        bar.close()
    records.update(shared_records)
    return CompressionReport([records[n] for n in reported], calibrated=calibrated)


def _summed_grams(grams, shapes, workers):
    """Each layer's XᵀX summed over the ranks; a layer no rank's calibration
    reached is the same ValueError on every rank (one rank's share of the data
    need not reach every layer: a mixture-of-experts expert, a branch)."""
    if not workers.shared:
        return grams
    seen = torch.tensor([g is not None for g in grams.values()], dtype=torch.float64)
    seen = workers.sum_(seen)
    check_all_seen([name for name, count in zip(grams, seen.tolist()) if count == 0])
    # Layers fed the same inputs hold one tensor (collect_input_grams), to be
    # summed once; they go on sharing it only where they share it on every
    # rank (on another rank's data their inputs may part): column i of
    # ``holders`` says, per rank, the first layer holding layer i's tensor.
    holders = torch.zeros(workers.world, len(grams), dtype=torch.float64)
    first, held = {}, {}
    for i, gram in enumerate(grams.values()):
        holders[workers.rank, i] = i if gram is None else first.setdefault(id(gram), i)
        if gram is not None:
            held[id(gram)] = held.get(id(gram), 0) + 1
    holders = workers.sum_(holders)
    groups = {}  # the same on every rank, in the same order
    for name, column in zip(grams, holders.T.tolist()):
        groups.setdefault(tuple(column), []).append(name)
    summed = {}
    for names in groups.values():
        gram = grams[names[0]]
        if gram is None:
            gram = torch.zeros(shapes[names[0]][1], shapes[names[0]][1], dtype=torch.float64)
        elif held[id(gram)] != len(names):
            gram = gram.clone()  # other layers here hold it too: theirs stays unsummed
        gram = workers.sum_(gram)
        summed.update(dict.fromkeys(names, gram))
    return summed


def _shared_layers(model, layers):
    """{name: note} for the layers whose module, weight or bias has another
    holder in the model, or whose weight shares its storage with another of
    the model's tensors (a view of a larger parameter)."""
    module_paths, holders, storages = places_of(model), {}, {}
    for module, attr, where, tensor in model_tensors(model):
        if attr in module._parameters:
            holders.setdefault(id(tensor), []).append(where)
        storage = storage_of(tensor)
        if storage is not None:
            storages.setdefault(storage, []).append((module, where))
    notes = {}
    for name, layer in layers.items():
        paths = module_paths.get(id(layer), [])

        def others(param):
            return [] if param is None else [h for h in holders.get(id(param), [])
                                             if h.rpartition(".")[0] not in paths]

        if len(paths) > 1:
            notes[name] = ("dense: the same module is also at "
                           + ", ".join(p for p in paths if p != name)
                           + "; replacing it in one place would add parameters")
        elif others(layer.weight):
            notes[name] = (f"dense: weight tied to {', '.join(others(layer.weight))}; "
                           "factorizing would add parameters and untie it")
        elif sharing := _sharing_storage(layer, storages):
            # Views of one memory (halves of a fused parameter): the others
            # keep all of it alive, so the factors would only add to it, and
            # the weight would no longer follow the memory it is a view of.
            notes[name] = (f"dense: weight shares its storage with {', '.join(sharing)}; "
                           "factorizing would add parameters, and the weight would no "
                           "longer be a view of that memory")
        elif others(layer.bias):
            # The new layer would get a bias of its own: training one layer's
            # bias would no longer move the other's.
            notes[name] = (f"dense: bias shared with {', '.join(others(layer.bias))}; "
                           "factorizing would untie it")
    return notes


def _sharing_storage(layer, storages):
    """The names of the other modules' tensors whose storage ``layer.weight``
    shares (``storages``: {storage: [(module, name)]}, as _shared_layers
    gathers them): overlapping or not, the storage stays whole while any of
    them holds it. The layer's own tensors leave with it (torch's
    spectral_norm sets the weight to a view of its weight_orig)."""
    storage = storage_of(layer.weight)
    if storage is None:
        return []
    return list(dict.fromkeys(where for module, where in storages.get(storage, ())
                              if module is not layer))


def _in_order(model, names):
    """``names`` in the model's order."""
    return [name for name, _ in model.named_modules() if name in names]


def _shared_records(selected, linears, shared):
    """{name: LayerReport} of the layers kept dense for ``shared``'s reasons.

    A weight several reported layers hold (two Linear layers tied to one
    matrix) counts once, at the first of them, so that the report's totals
    count each tensor once, as the model holds it.
    """
    counted, records = {}, {}
    for name in selected:
        if name not in shared:
            continue
        layer, note = linears[name], shared[name]
        if type(layer) is nn.Linear or is_conv1d(layer):
            weight, shape = layer.weight, tuple(dense_weight(layer).shape)
        else:
            # Left alone: its weight is never read through the layer, where a
            # parametrization would compute it (spectral_norm's taking a
            # power-iteration step, which changes the model); one that is no
            # stored parameter is the layer's own.
            weight = layer._parameters.get("weight", layer)
            shape = (layer.out_features, layer.in_features)
        first = counted.setdefault(id(weight), name)
        size = shape[0] * shape[1] if first == name else 0
        if first != name:
            note += f"; its weight is counted at {first}"
        records[name] = LayerReport(name, shape, None, size, size, 0.0, None, note=note)
    return records


def _fingerprints(layers):
    """{name: (dtype, sums of weight, sums of bias)}, each (Σt, Σ|t|, Σt²) in
    float64: equal but for rounding on ranks holding the same layers,
    different where a rank loaded other weights (see _same_fingerprints)."""
    def sums(t):
        if t is None:
            return None
        t = t.detach().double()
        return tuple(float(v) for v in (t.sum(), t.abs().sum(), t.square().sum()))

    return {name: (str(layer.weight.dtype), sums(layer.weight), sums(layer.bias))
            for name, layer in layers.items()}


# The sums' rounding differs with the device and the thread count (a sum
# near 0 of a centred weight keeps no digit of its own): they are compared
# to this fraction of Σ|t| (Σt² to this fraction of itself).
_FINGERPRINT_TOLERANCE = 1e-6


def _same_fingerprints(mine, theirs):
    """Whether two ranks' _fingerprints agree (NaN, as in a bias, equals NaN)."""
    def close(a, b, scale):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= _FINGERPRINT_TOLERANCE * scale

    def same_sums(a, b):
        if a is None or b is None:
            return a is b
        (total, size, squares), (total2, size2, squares2) = a, b
        return (close(size, size2, abs(size)) and close(squares, squares2, abs(squares))
                and close(total, total2, abs(size)))

    if mine.keys() != theirs.keys():
        return False
    return all(mine[n][0] == theirs[n][0] and same_sums(mine[n][1], theirs[n][1])
               and same_sums(mine[n][2], theirs[n][2]) for n in mine)


def rounding_note(dtype, exact, error, energy, tol):
    """The note for a layer whose ``energy`` or ``tol`` target the factors meet
    in float64 (relative error ``exact``) but miss once rounded to ``dtype``
    (relative ``error``, in the metric the target is in); else ""."""
    if dtype == torch.float64:
        return ""
    what = f"rounding the factors to {dtype_name(dtype)}, as stored,"
    if tol is not None and error > tol >= exact:
        return (f"{what} leaves a relative error of {error:.3g}, above tol={tol} "
                f"({exact:.3g} before rounding)")
    if energy is not None and 1.0 - error ** 2 < energy <= 1.0 - exact ** 2:
        return (f"{what} keeps {1.0 - error ** 2:.6g} of the energy (1 − error²), below "
                f"energy={energy} ({1.0 - exact ** 2:.6g} before rounding)")
    return ""


def _low_rank_like(layer, B, A):
    """A LowRankLinear with factors B·A and ``layer``'s bias, on its device and in its dtype."""
    dtype, home = layer.weight.dtype, layer.weight.device
    # Called under torch.inference_mode(), the new parameters would be
    # inference tensors, which the model could never train again.
    with torch.inference_mode(False):
        new = LowRankLinear.from_factors(
            A.to(device=home, dtype=dtype), B.to(device=home, dtype=dtype),
            None if layer.bias is None else layer.bias.detach().to(device=home, dtype=dtype))
    return inherit_requires_grad(new, layer)


def _sensitivities(model, calibration, names, layers, spectra, shapes, ratio, owners, workers,
                   swaps, bar):
    """{name: s}: each rank probes the layers it owns at the uniform rank for ``ratio``.

    Each probe is made when its turn comes, so that one at a time exists;
    ``bar`` counts the calibration runs.
    """
    probes, error, found = {}, None, {}

    def probe(layer, spectrum, r):
        return lambda: _low_rank_like(layer, *spectrum.factors(r))

    try:
        for name in names:
            if owners[name] != workers.rank:
                continue
            spectrum = spectra[name]
            r = rank_for_ratio(*shapes[name], ratio)
            probes[name] = (probe(layers[name], spectrum, r), spectrum.relative_tail(r) ** 2)
        if probes:
            found = measure_sensitivity(model, calibration, probes, swaps,
                                        allow_empty=workers.shared, ran=lambda: bar.update(1))
    except Exception as exc:
        error = exc
    workers.all_succeeded(error)
    for name in names:
        value = found.get(name)
        shared = workers.share(owners[name], None if value is None else torch.tensor(
            [value], dtype=torch.float64), (1,))
        found[name] = float(shared[0])
    unmeasured = [name for name in names if math.isnan(found[name])]
    if unmeasured:
        measured = sorted(v for v in found.values() if not math.isnan(v))
        neutral = measured[len(measured) // 2] if measured else 1.0
        warnings.warn(
            f"compress_model: the sensitivity of layer(s) {preview(unmeasured)} cannot be "
            "measured: truncated to their probe rank they compute the same on the calibration "
            "(their calibration inputs span fewer directions than that rank, too few "
            "calibration tokens, or their weight is of that rank or lower itself), or the "
            "measuring rank's share of the data never runs them; they take the median of the "
            f"others ({neutral:.3g}). Where the calibration is too small, more data measures "
            "them", stacklevel=5)  # the caller's line (past the two decorators)
        for name in unmeasured:
            found[name] = neutral
    return found
