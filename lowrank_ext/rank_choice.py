"""How compress_model chooses ranks: its targets (ratio, rank, energy, tol)
checked, a rank per layer from a target, ranks rounded to blocks, and one
parameter budget shared out across layers by the energy each rank keeps
(optionally weighted by measured sensitivity).
"""

from __future__ import annotations

import heapq
import math
import numbers

import torch

from ._names import owner_prefix, preview
from .nn import break_even_rank, rank_for_ratio, ratio_budget
from .spectra import determined

ALLOCATIONS = ("sensitivity", "global", "uniform")


def check_targets(rank, ratio, energy, tol, allocation):
    given = [n for n, v in (("ratio", ratio), ("rank", rank), ("energy", energy), ("tol", tol))
             if v is not None]
    if len(given) != 1:
        seen = " and ".join(given) if given else "none"
        raise ValueError(f"compress_model: give exactly one of ratio, rank, energy or tol, "
                         f"got {seen}")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"compress_model: rank must be an int, got {type(rank).__name__}")
        if rank < 1:
            raise ValueError(f"compress_model: rank must be >= 1, got {rank}")
    if ratio is not None:
        try:
            rank_for_ratio(2, 2, ratio)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"compress_model: {exc}") from None
    for name, value, low_ok in (("energy", energy, False), ("tol", tol, True)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"compress_model: {name} must be a real number, got "
                            f"{type(value).__name__}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"compress_model: energy must be in (0, 1], got {energy}")
    if tol is not None and not tol >= 0.0:
        raise ValueError(f"compress_model: tol must be >= 0, got {tol}")
    if allocation is not None and allocation not in ALLOCATIONS:
        raise ValueError(f"compress_model: allocation must be 'sensitivity', 'global' or "
                         f"'uniform', got {allocation!r}")
    if allocation is not None and ratio is None:
        # It shares out ratio's budget; rank, energy and tol set each layer's own.
        raise ValueError(f"compress_model: allocation applies to ratio only, got "
                         f"allocation={allocation!r} with {given[0]}")


def rank_from_target(spectrum, energy, tol):
    from .svd import choose_rank

    return choose_rank(spectrum.energy.sqrt(), energy=energy, tol=tol)


def round_rank(rank, multiple, d, k, *, up=False):
    """``rank`` rounded to a multiple of ``multiple`` (down, or ``up``), within [1, min(d, k)].

    Rounding down never goes below one multiple; either way the result is
    capped at min(d, k), the full rank, which need not be a multiple.
    """
    if multiple == 1:
        return rank
    steps = -(-rank // multiple) if up else max(1, rank // multiple)
    return min(steps * multiple, min(d, k))


def check_blocks_fit(shapes, ratio, multiple, allocation, owner="compress_model"):
    """Refuse a ``ratio`` whose budget cannot hold the smallest ranks allowed.

    Every factorized layer gets at least one block of ``multiple`` ranks
    (rank 1 when ``multiple`` is 1). Rounding a smaller share up would break
    the budget: the model would silently keep more than ``ratio`` of its
    weights. (With ``multiple`` 1, ``allocation="uniform"`` still gives a
    layer too small for its share, a two-class head, rank 1: a few parameters
    over, where the others' rounding down usually makes up for them.)
    """
    if multiple > 1:
        for name, (d, k) in shapes.items():
            if multiple >= break_even_rank(d, k):
                raise ValueError(
                    f"{owner_prefix(owner)}layer {name!r} ({d}×{k}) cannot be factorized in "
                    f"blocks of {multiple} ranks: d·k/(d+k) = {break_even_rank(d, k):.1f} saves nothing "
                    "beyond that; use a smaller rank_multiple or exclude the layer")
            if allocation == "uniform" and rank_for_ratio(d, k, ratio) < multiple:
                raise ValueError(
                    f"{owner_prefix(owner)}ratio {ratio} gives layer {name!r} ({d}×{k}) rank "
                    f"{rank_for_ratio(d, k, ratio)}, less than one block of rank_multiple "
                    f"{multiple}; raise the ratio, lower rank_multiple or exclude the layer")
    # A layer no rank saves anything on (a one-output head) stays dense: its
    # d·k parameters count against the budget as allocate_ranks counts them,
    # so that the ratio holds over every selected layer or this raises.
    # (Where no layer can be factorized, all stay dense whatever the ratio.)
    # "uniform" has no shared budget: each layer keeps the ratio it can, and
    # one that stays dense is left out, as before.
    counted = {name: (d, k) for name, (d, k) in shapes.items()
               if allocation != "uniform" or multiple < break_even_rank(d, k)}
    least_of = {name: least_parameters(d, k, multiple) for name, (d, k) in counted.items()}
    total = sum(d * k for d, k in counted.values())
    least = sum(least_of.values())
    if least > ratio_budget(ratio, total) and least < total:
        small = [name for name, (d, k) in counted.items()
                 if ratio_budget(ratio, d * k) < least_of[name]]
        smallest = f"rank {multiple}" if multiple == 1 else f"one block of {multiple} ranks"
        if least > sum(multiple * (d + k) for d, k in counted.values()
                       if multiple < break_even_rank(d, k)):
            smallest += " (dense where that saves nothing)"
        raise ValueError(
            f"{owner_prefix(owner)}ratio {ratio} is too small: {smallest} per layer already keeps "
            f"{least / total:.3f} of the weights (layers below that share: "
            f"{preview(small)}); raise the ratio"
            + (" or lower rank_multiple" if multiple > 1 else "")
            + ", or exclude the smallest layers")


def least_parameters(d, k, multiple):
    """The fewest parameters a d×k layer keeps: one block of ``multiple`` ranks,
    or d·k where even that saves nothing (it stays dense)."""
    return multiple * (d + k) if multiple < break_even_rank(d, k) else d * k


def _without_roundoff(energy, n):
    """``energy`` (descending) with the values :func:`determined` counts as
    round-off set to 0."""
    kept = determined(energy, n)
    return energy if kept == energy.numel() else torch.cat(
        [energy[:kept], energy.new_zeros(energy.numel() - kept)])


def allocate_ranks(spectra, shapes, ratio, weights=None, multiple=1, whole_layers=False):
    """Ranks maximising the relative output energy kept under ratio·Σd·k parameters.

    With ``weights`` ({name: s}), layer energies count s times (sensitivity).

    Greedy over the candidate ranks of all layers, best energy per parameter
    first, ``multiple`` ranks at a time. A layer's σ_i² decrease with i, so
    each layer gets a prefix; every layer gets at least rank ``multiple``
    (:func:`check_blocks_fit` makes sure that fits), none grows past
    ⌊d·k/(d+k)⌋ (where factorizing stops saving anything) or into ranks that
    keep no energy (eigh's round-off counts as none), so the budget may be left
    partly unspent.

    With ``whole_layers``, each layer at rank r is also offered whole: kept
    dense, for the d·k − r·(d+k) parameters its factors lack, it keeps all
    of its energy. Near ⌊d·k/(d+k)⌋ that costs next to nothing, where the
    last ranks up to it would still leave the rest of the spectrum out. A
    layer kept whole gets rank min(d, k) (at or past d·k/(d+k): it stays
    dense). compress_model offers it where the energies are weighted by
    measured sensitivity: on all-MiniLM-L6-v2 at ratio 0.8 that took the
    mean embedding cosine from 0.948 to 0.959. By each layer's own error
    alone, the layers with the flattest spectra look best kept whole, and
    there it took parameters from the layers that move the outputs most
    (0.720 to 0.715 at 0.5, 0.920 to 0.913 at 0.8).
    """
    budget = ratio_budget(ratio, sum(d * k for d, k in shapes.values()))
    ranks = {name: multiple for name in spectra}
    spent = sum(least_parameters(d, k, multiple) for d, k in shapes.values())
    heap = []
    # Energies of eigh's round-off (a weight or calibration of lower rank
    # than the layer's) count as none.
    energies = {name: _without_roundoff(spectra[name].energy, max(shapes[name]))
                for name in spectra}

    def relative(name, energy):
        spectrum = spectra[name]
        gain = energy / spectrum.total if spectrum.total else 0.0
        return gain * (1.0 if weights is None else weights[name])

    def push(name):
        r = ranks[name]
        d, k = shapes[name]
        if r >= break_even_rank(d, k):
            return  # dense already: nothing more to give it
        energy = energies[name]
        # Ranks (or a whole layer) that remove none of the error (a layer
        # whose output is 0 on the calibration, one the model's outputs
        # ignore, ranks past a low-rank weight's) would only spend the
        # budget's leftovers on a larger model.
        if r + multiple <= min(math.floor(break_even_rank(d, k)), energy.numel()):
            gain = relative(name, float(energy[r:r + multiple].sum()))
            if gain > 0:
                heapq.heappush(heap, (-gain / (multiple * (d + k)), name, r, False))
        if not whole_layers:
            return
        rest = relative(name, float(energy[r:].sum()))  # (all min(d, k) of them)
        if rest > 0:
            cost = d * k - r * (d + k)  # > 0, as r < d·k/(d+k)
            heapq.heappush(heap, (-rest / cost, name, r, True))

    for name in spectra:
        push(name)
    while heap:
        _, name, r, whole = heapq.heappop(heap)
        if ranks[name] != r:
            continue  # offered at a rank the layer has left
        d, k = shapes[name]
        cost = d * k - r * (d + k) if whole else multiple * (d + k)
        if spent + cost > budget:
            continue  # this does not fit; smaller steps, here or elsewhere, may
        ranks[name] = min(d, k) if whole else r + multiple
        spent += cost
        push(name)
    return ranks
