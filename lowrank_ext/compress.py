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
"""

from __future__ import annotations

import fnmatch
import heapq
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._checks import SUPPORTED_DTYPES, check_device, dtype_name
from ._modules import (COMPILED_ALONE_WHY, Swaps, compiled_alone, dense_weight,
                       held_besides_weight, instance_forward, instance_forward_text,
                       is_conv1d, is_sharded, plain_attributes, refuse_distributed_wrapper,
                       keeps_encoder_flags, places_of)
from ._names import preview
from ._workers import Workers
from .calibration import (check_all_seen, check_inputs_not_all_zero, collect_input_grams,
                          replayable, same_random_numbers)
from .sensitivity import measure_sensitivity
from .nn import (LoRALinear, LowRankLinear, break_even_rank, inherit_requires_grad,
                 rank_for_ratio, ratio_budget)
from .report import CompressionReport, LayerReport

_ALLOCATIONS = ("sensitivity", "global", "uniform")


# --- selecting layers ------------------------------------------------------------
def _prefix(owner):
    """Messages start with the function that failed; the command line gives none
    (its error line names the command)."""
    return f"{owner}: " if owner else ""


def _as_patterns(name, patterns, owner="compress_model"):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"{_prefix(owner)}{name} must be a string or a list of strings, got "
                        f"{type(patterns).__name__}") from None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{_prefix(owner)}{name} must be a non-empty string or list of strings")
    return patterns


def adapter_bases(model):
    """Ids of the layers that are the base of a ``LoRALinear`` in ``model``:
    swapping one would take the adapter's base away from under it."""
    return {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}


def plain_linears(model, *, conv1d=False, replacing=False):
    """{name: module} for every ``nn.Linear`` (not a subclass) of the model.

    Subclasses are left out because their owners may read their weight
    directly (``nn.MultiheadAttention`` passes ``out_proj.weight`` to its
    functional form, never calling the layer); so are parametrized layers
    and plain ones a layer in their place would not stand for (see
    :func:`left_alone_linears`; ``replacing`` as there). The frozen base
    layer inside a ``LoRALinear`` is not one of them either: swapping it
    would take the adapter's base away from under it. With ``conv1d``,
    transformers' ``Conv1D`` layers (a Linear with its weight transposed)
    are included.
    """
    owned = adapter_bases(model) | compiled_alone(model)
    return {name: m for name, m in model.named_modules()
            if (type(m) is nn.Linear or (conv1d and is_conv1d(m))) and id(m) not in owned
            and not_standing_for(m, replacing) is None}


def not_standing_for(layer, replacing=True):
    """Why a layer put in the place of ``layer`` (a plain nn.Linear or Conv1D)
    would not stand for it, or None: a forward set on the instance
    (accelerate's hooks for device_map and offloading), which neither a
    LowRankLinear nor a LoRALinear (which reads its base's weight) would run;
    or, where ``replacing`` it (compress_model, load_compressed: add_lora's
    LoRALinear keeps the layer whole as its base), parameters, buffers or
    submodules besides its weight and bias, which a LowRankLinear in its
    place would lose."""
    kind = "an nn.Linear" if type(layer) is nn.Linear else f"a {type(layer).__name__}"
    if instance_forward(layer):
        return (f"{kind} with {instance_forward_text(layer)}, which a layer in its place "
                "would never run (it reads the weight and bias instead)")
    if replacing:
        held = held_besides_weight(layer)
        if held:
            return (f"{kind} holding {', '.join(held)} besides its weight and bias, which "
                    "a LowRankLinear in its place would lose")
    return None


def left_alone_linears(model, *, replacing=False):
    """{name: (module, why)} for the ``nn.Linear`` layers :func:`plain_linears`
    leaves out, other than adapters' bases: subclasses of ``nn.Linear``, and
    layers with a parametrization (``weight_norm``, ``spectral_norm``,
    ``orthogonal``, ...), which torch makes instances of a subclass. Their
    weight is not simply used as it is stored, so a LowRankLinear (or an
    adapter) in their place would compute something else; ``why`` says so, for
    reports and error messages. Also layers that ``torch.compile`` wraps on
    their own (:func:`compiled_alone`): one put in their place would never run;
    and plain layers (Conv1D too) that a layer in their place would not stand
    for (:func:`not_standing_for`; ``replacing`` as there, False for
    add_lora, which wraps layers)."""
    owned = adapter_bases(model)
    compiled = compiled_alone(model)
    found = {}
    for name, m in model.named_modules():
        if id(m) in compiled and (isinstance(m, nn.Linear) or is_conv1d(m)) and id(m) not in owned:
            found[name] = (m, COMPILED_ALONE_WHY)
            continue
        if (type(m) is nn.Linear or is_conv1d(m)) and id(m) not in owned:
            why = not_standing_for(m, replacing)
            if why is not None:
                found[name] = (m, why)
            continue
        if type(m) is nn.Linear or not isinstance(m, nn.Linear) or id(m) in owned:
            continue
        if parametrize.is_parametrized(m):
            original = type(m).__mro__[1]  # torch's Parametrized<cls> derives from cls
            kind = ("nn.Linear" if original is nn.Linear
                    else f"{original.__name__}, a subclass of nn.Linear,")
            how = "; ".join(f"{tensor}: {', '.join(type(p).__name__ for p in chain)}"
                            for tensor, chain in m.parametrizations.items())
            why = (f"a parametrized {kind} ({how}), computing those tensors at every use; "
                   "torch.nn.utils.parametrize.remove_parametrizations makes it a plain layer")
        else:
            holder = model.get_submodule(name.rpartition(".")[0]) if name else None
            why = (f"{type(m).__name__}, a subclass of nn.Linear: "
                   + ("the {} holding it reads its weight directly{}".format(
                       *attention_holding(holder))
                      if isinstance(holder, nn.MultiheadAttention) else
                      "its forward, or the module holding it, may use the weight otherwise "
                      "than nn.Linear does"))
        found[name] = (m, why)
    return found


def attention_holding(holder):
    """(name, remedy) for messages about the out_proj of an
    nn.MultiheadAttention, which reads that layer's weight directly: the
    class itself is split by lx.split_attention; a subclass, which
    split_attention leaves alone, is named as what it is, with no remedy."""
    if type(holder) is nn.MultiheadAttention:
        return ("nn.MultiheadAttention",
                "; lx.split_attention(model) first makes it a plain nn.Linear")
    return (f"{type(holder).__name__} (a subclass of nn.MultiheadAttention, which "
            "lx.split_attention leaves alone)", "")


def name_matches(name, pattern):
    """True when a module name matches a glob pattern, in full or as a dotted suffix.

    ``"query"`` matches ``"encoder.layer.0.attention.self.query"`` (peft's
    target_modules habit); ``"encoder.*.dense"`` matches with fnmatch rules.
    A pattern equal to the name (or its dotted suffix) matches too, as in
    peft: a name holding glob characters (a ModuleDict key ``"x[1]"``) is
    matched by itself, where fnmatch reads ``[1]`` as a character class.
    """
    return (name == pattern or name.endswith("." + pattern)
            or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern))


def _listed(why):
    """``name (why)`` for each of ``{name: why}``, shortened; the model itself has no name."""
    return preview(f"{name or 'the model'} ({text})" for name, text in why.items())


def left_alone_suffix(model, *, replacing=False):
    """`` (left alone: name (why), ...)`` naming the model's layers left alone, or ""."""
    alone = {name: why
             for name, (_, why) in left_alone_linears(model, replacing=replacing).items()}
    return f" (left alone: {_listed(alone)})" if alone else ""


_COMPILED_CHILD = "._orig_mod"


def select_names(names, include=None, exclude=None, *, owner="compress_model", what="layer",
                 aliases=None, left_alone=None):
    """The names kept by include/exclude glob patterns; a pattern matching nothing is an error.

    ``aliases`` ({name: every name of that module}) lets a pattern match a
    module by any of its names. ``left_alone`` ({name: why}) marks names the
    caller will not touch: they are kept like the others (a report lists
    them), and an exclude pattern may match them alone, but an include
    pattern that does is a TypeError saying why, and a selection of them
    alone is an error.
    """
    include = _as_patterns("include", include, owner)
    exclude = _as_patterns("exclude", exclude, owner)
    aliases = aliases or {}
    left_alone = left_alone or {}

    def names_of(name):
        names = aliases.get(name, (name,))
        if name in left_alone:
            # A module torch.compile wraps on its own is named through the
            # wrapper's _orig_mod; the user knows it by the wrapper's name,
            # and should hear why it is left alone rather than of no match.
            names = (*names, *(n[:-len(_COMPILED_CHILD)] for n in names
                               if n.endswith(_COMPILED_CHILD)))
        return names

    def matches(name, pattern):
        return any(name_matches(n, pattern) for n in names_of(name))

    usable = [n for n in names if n not in left_alone]
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if any(matches(n, pattern) for n in usable):
                continue
            alone = [n for n in left_alone if matches(n, pattern)]
            if alone and label == "include":
                raise TypeError(f"{_prefix(owner)}include pattern {pattern!r} matches only "
                                f"layers left alone: {_listed({n: left_alone[n] for n in alone})}")
            if not alone:
                raise ValueError(
                    f"{_prefix(owner)}{label} pattern {pattern!r} matches no {what} "
                    f"(candidates: {preview(a for n in usable for a in aliases.get(n, (n,)))})")
    chosen = [n for n in names
              if (include is None or any(matches(n, p) for p in include))
              and not any(matches(n, p) for p in exclude or ())]
    if all(n in left_alone for n in chosen):
        alone = (f" (only layers left alone: {_listed({n: left_alone[n] for n in chosen})})"
                 if chosen else "")
        raise ValueError(f"{_prefix(owner)}include/exclude leave no {what} selected{alone}")
    return chosen


def select_layers(model, layers, include=None, exclude=None, *, owner="compress_model",
                  what="layer", replacing=False):
    """(chosen, left): the names of ``layers`` ({name: module}, as named_modules()
    names them) that include/exclude select, and those of the layers left
    alone (:func:`left_alone_linears`, ``replacing`` as there) that they
    select, {name: (module, why)}; both in the model's order.

    A module registered under several names (``m.dec = m.enc``) is matched by
    every one of them: it is selected when any of its names matches an
    include pattern, and left out when any matches an exclude pattern (one
    object, it is replaced everywhere or nowhere).
    """
    alone = left_alone_linears(model, replacing=replacing)
    places = places_of(model)
    order = [name for name, m in model.named_modules() if name in layers or name in alone]
    modules = {**{n: m for n, (m, _) in alone.items()}, **layers}
    chosen = select_names(order, include, exclude, owner=owner, what=what,
                          aliases={n: places[id(modules[n])] for n in order},
                          left_alone={n: why for n, (_, why) in alone.items()})
    return [n for n in chosen if n in layers], {n: alone[n] for n in chosen if n in alone}


# --- per-layer spectra -------------------------------------------------------------
_EPS = torch.finfo(torch.float64).eps
# Eigenvalues of an n×n problem (or one whose entries are sums over n terms)
# below about n·eps·λ₀ are eigh's round-off: their directions are arbitrary.
# Those up to this many times that bound count as such too.
_ROUNDOFF_MARGIN = 10


def _determined(lam, n):
    """How many of the descending eigenvalues ``lam`` stand clear of round-off (see above)."""
    if not lam.numel() or not lam[0] > 0:
        return 0
    return int((lam > float(lam[0]) * n * _EPS * _ROUNDOFF_MARGIN).sum())


# The eigenproblems below square W (W·G·Wᵀ, CᵀC): float64 weights beyond
# about 1e±150 would overflow to Inf or underflow to 0 there (factors of NaN or
# of zeros, silently), and a calibration Gram far out of range would do the
# same with them. Such operands are scaled by a power of two first, which is
# exact; the energies then come in those units, and only their ratios are used.
_SAFE_EXPONENT = {"weight": 128, "gram": 256}


def _range_scale(t, what):
    """2**-e for max|t| = m·2**e (m in [0.5, 1)) where |e| is beyond what
    ``what`` ("weight" or "gram") safely has in the products above, else 1.0."""
    if not t.numel():
        return 1.0
    low, high = torch.aminmax(t.detach())
    _, e = math.frexp(max(-float(low), float(high)))
    # (At most 2**1022: a subnormal maximum gives e down to -1073.)
    return math.ldexp(1.0, min(-e, 1022)) if abs(e) > _SAFE_EXPONENT[what] else 1.0


def _left_singular(weight, G, count, resolution, device, store=torch.float64, w_scale=1.0):
    """(energies, U): all min(d, k) energies σ_i² of W·R (R·Rᵀ = G, R = I
    without G), descending, and U's columns, orthonormal to ``resolution``, the
    left singular vectors of the leading ones, at most ``count``, that stand
    clear of round-off. W is ``weight`` times ``w_scale`` (a power of two) in
    float64 on ``device``, converted here (a block of rows at a time where the
    whole is not needed) and let go once used. U comes in float64, or in
    ``store``, the dtype it is kept in, where it is final as made: ``count``
    columns needing no QR."""
    d, k = weight.shape
    n = max(d, k)

    def rows_of_w(rows=slice(None)):
        W = weight.detach()[rows].to(device=device, dtype=torch.float64)
        return W if w_scale == 1.0 else W * w_scale  # never in place: W may be the weight

    if d <= k:
        # Left singular vectors of W·R are the eigenvectors of W·G·Wᵀ (d×d).
        W = rows_of_w()
        if G is None:
            M = W @ W.T
        else:
            M = torch.empty(d, d, dtype=torch.float64, device=device)
            for rows in _row_blocks(d, k):  # no d×k W·G
                M[rows] = W[rows] @ G @ W.T
        del W
        M = M + M.T
        lam, U = torch.linalg.eigh(M.div_(2))
        del M
        lam = lam.flip(0)
        # Only the columns kept are reordered (copied), not all d of them.
        return lam, U[:, d - min(count, _determined(lam, n)):].flip(1)
    # Through the k×k side: C = W·R, CᵀC = V·Σ²·Vᵀ, U = C·V·Σ⁻¹.
    if G is None:
        C = rows_of_w()
    else:
        lam_g, Q = torch.linalg.eigh(G)
        lam_g, Q = lam_g.flip(0), Q.flip(1)
        # G's round-off eigenvalues would add noise directions to C.
        kept = _determined(lam_g, n)
        R = Q[:, :kept] * lam_g[:kept].sqrt()  # R·Rᵀ = G
        # C a block of rows at a time: W itself is never whole in float64.
        C = torch.empty(d, kept, dtype=torch.float64, device=device)
        for rows in _row_blocks(d, k):
            C[rows] = rows_of_w(rows) @ R
    lam, V = torch.linalg.eigh(C.T @ C)
    lam, V = lam.flip(0), V.flip(1)
    live = min(count, _determined(lam, n))
    V, sigma = V[:, :live], lam[:live].sqrt()
    # Dividing by σ_i leaves the columns orthonormal only to about
    # n·eps·σ₀²/σ_i²; where that exceeds ``resolution``, their QR factor, which
    # spans the same leading directions, is used.
    qr = live and n * _EPS * float(lam[0] / lam[live - 1]) > resolution
    if qr or live < count:
        U = (C @ V).div_(sigma)
        del C
        if qr:
            U = torch.linalg.qr(U).Q
    else:
        # Final as made: a block of rows at a time into ``store``, where a
        # whole float64 U would be about as large as W itself.
        U = torch.empty(d, live, dtype=store, device=C.device)
        for rows in _row_blocks(d, k):
            U[rows] = (C[rows] @ V).div_(sigma)
    if lam.numel() < k:  # C has fewer columns than W where G's rank is below k
        lam = torch.cat([lam, lam.new_zeros(k - lam.numel())])
    return lam, U


# Work on the rows of a d×k weight (W − B·A for the errors) is done over
# blocks of this many bytes of float64 rows, so that its temporaries stay
# small whatever the layer's size.
_BLOCK_BYTES = 1 << 24


def _row_blocks(d, k):
    """Slices over the d rows of a d×k float64 matrix, a block of _BLOCK_BYTES at a time."""
    step = max(1, _BLOCK_BYTES // (8 * k))
    return [slice(start, start + step) for start in range(0, d, step)]


class _Spectrum:
    """Leading left singular vectors of W (or of W·R) and the energy each one carries.

    Computed from a min(d, k)-sized symmetric eigenproblem in float64 rather
    than an SVD of the d×k matrix: several times faster on the CPU, and the
    leading vectors, the only ones kept, are accurate.

    Where the calibration determines fewer directions than a useful rank can
    take (fewer independent inputs than that rank, or W·R of lower rank), the
    remaining columns of U are the leading left singular vectors of the part
    of W outside the determined ones: every rank is still the projection of W
    onto orthonormal columns (‖B·A‖ ≤ ‖W‖), and the extra ranks keep what
    matters most in weight space, where the calibration says nothing. Their
    energies stay the ones measured (about 0).

    The work runs on ``device`` (default: the weight's); the results are kept
    on the weight's device, so that only one layer at a time occupies
    ``device``.
    """

    def __init__(self, weight, gram, device=None):
        home = weight.device
        device = home if device is None else device
        d, k = weight.shape
        G = None if gram is None else gram.to(device)
        # Powers of two that keep the eigenproblems in range (_range_scale):
        # the energies are those of (w_scale·W)·R with R·Rᵀ = g_scale·G.
        self.w_scale = _range_scale(weight, "weight")
        self.g_scale = 1.0 if G is None else _range_scale(G, "gram")
        if self.g_scale != 1.0:
            G = G * self.g_scale
        self.device = device
        self.gram = gram
        self._weight = weight
        # What is kept for the factors is bounded by the model itself: no
        # float64 copy of the weight (it is read again from the layer), and
        # only the columns of U a useful rank can take (below d·k/(d+k)), in
        # float32 unless the weight is float64; :meth:`trim` cuts them to the
        # rank once it is chosen. The energies stay whole.
        keep = max(1, min(min(d, k), math.floor(break_even_rank(d, k))))
        store = torch.float64 if weight.dtype == torch.float64 else torch.float32
        resolution = torch.finfo(store).eps
        lam, U = _left_singular(weight, G, keep, resolution, device, store, self.w_scale)
        if U.shape[1] < keep:
            # W − U·Uᵀ·W, formed in a copy of W a block of rows at a time: no
            # other d×k temporary.
            rest = weight.detach().to(device=device, dtype=torch.float64, copy=True)
            P = U.T @ rest
            for rows in _row_blocks(d, k):
                rest[rows] -= U[rows] @ P
            _, more = _left_singular(rest, None, keep - U.shape[1], resolution, device,
                                     w_scale=self.w_scale)
            del rest
            # Zero columns where even W has no more directions (a W of rank
            # below ``keep``): QR still makes them orthonormal, adding nothing.
            missing = U.new_zeros(d, keep - U.shape[1] - more.shape[1])
            U = torch.cat([U, more, missing], 1)
            del more
            U = torch.linalg.qr(U).Q
        self.U = U.to(device=home, dtype=store)
        self.energy = lam.clamp_min(0).cpu()  # σ_i², descending, in the units above
        self.total = float(self.energy.sum())

    @property
    def weight(self):
        """The layer's weight in float64 on the compute device."""
        return self._weight.detach().to(device=self.device, dtype=torch.float64)

    @property
    def dtype(self):
        """The layer's dtype, which its factors are stored in."""
        return self._weight.dtype

    def trim(self, rank):
        """Keep only the columns of U that factors of ``rank`` use; 0 (the
        layer stays dense) lets go of U and the Gram (:meth:`forget`)."""
        if not rank:
            self.forget()
        elif rank < self.U.shape[1]:
            self.U = self.U[:, :rank].clone()

    def factors(self, rank):
        """(B, A) in float64 with B·A the best rank-``rank`` map in this metric."""
        if rank > self.U.shape[1]:
            raise ValueError(f"rank {rank} is beyond the {self.U.shape[1]} kept directions")
        U_r = self.U[:, :rank].to(device=self.device, dtype=torch.float64)
        A = U_r.T @ self.weight
        return U_r.contiguous(), A.contiguous()

    def stored_factors(self, rank, W):
        """:meth:`factors` rounded to the layer's dtype: B on its device, A on
        the compute device (``W``: :attr:`weight`, which the caller holds)."""
        if rank > self.U.shape[1]:
            raise ValueError(f"rank {rank} is beyond the {self.U.shape[1]} kept directions")
        U_r = self.U[:, :rank]
        # A = U_rᵀ·W summed over blocks of rows: no float64 copy of U_r.
        A = W.new_zeros(rank, W.shape[1])
        for rows in _row_blocks(*W.shape):
            A.addmm_(U_r[rows].to(device=self.device, dtype=torch.float64).T, W[rows])
        A = A.to(self.dtype)
        # U is stored in float32 or float64, either holding exactly the float64
        # B of :meth:`factors`: rounded from it, B is the same, and no copy
        # where the layer is in U's dtype.
        return U_r.to(self.dtype), A

    def forget(self):
        """Let go of what only the factors need (U, the Gram): the energies stay."""
        self.U = self.gram = None

    def relative_tail(self, rank):
        """√(Σ_{i>r} σ_i² / Σ σ_i²): the relative error left at this rank."""
        return _relative_tail(self.energy, self.total, rank)


class _SharedSpectrum:
    """The energies of a layer factorized by another rank: enough to choose its rank."""

    def __init__(self, energy):
        self.energy = energy
        self.total = float(energy.sum())

    def relative_tail(self, rank):
        return _relative_tail(self.energy, self.total, rank)


def _relative_tail(energy, total, rank):
    if total == 0.0:
        return 0.0
    return math.sqrt(max(0.0, float(energy[rank:].sum())) / total)


def _errors(spectrum, W, B, A):
    """(relative error in weight space, relative error in output space or None)
    of the factors B·A (of any dtype) against ``W``, the layer's weight in float64.
    Both are measured in the spectrum's units (its powers of two), where the
    squares stay in range."""
    A = A.to(device=W.device, dtype=torch.float64)
    G = None if spectrum.gram is None else spectrum.gram.to(W.device)
    if G is not None and spectrum.g_scale != 1.0:
        G = G * spectrum.g_scale
    weight_err = output_err = norm_w = 0.0
    for rows in _row_blocks(*W.shape):
        diff = W[rows] - B[rows].to(device=W.device, dtype=torch.float64) @ A
        if spectrum.w_scale != 1.0:
            diff.mul_(spectrum.w_scale)
            norm_w += float((W[rows] * spectrum.w_scale).square().sum())
        else:
            norm_w += float(W[rows].square().sum())
        weight_err += float(diff.square().sum())
        if G is not None:
            output_err += float(torch.einsum("ij,jk,ik->", diff, G, diff))
    weight_error = math.sqrt(weight_err / norm_w) if norm_w else 0.0
    output_error = None
    if G is not None:
        # ‖W·R‖², the sum of the energies: tr(W·G·Wᵀ) without another pass over W.
        ref = spectrum.total
        output_error = math.sqrt(max(output_err, 0.0) / ref) if ref > 0 else 0.0
    return weight_error, output_error


def _check_finite_inputs(grams):
    """A ValueError naming the layers whose calibration inputs were not all finite.

    NaN or Inf in a layer's inputs (or values whose squares overflow float64)
    make XᵀX non-finite, and no truncation can be chosen from it. Every rank
    holds the summed matrices, so all raise alike.
    """
    # By blocks of rows: isfinite on a whole k×k Gram takes several of its size.
    bad = [name for name, gram in grams.items()
           if not all(bool(torch.isfinite(gram[rows]).all()) for rows in _row_blocks(*gram.shape))]
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
                spectrum = _Spectrum(dense_weight(layers[name]), grams.get(name), device)
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
                spectra[name] = _SharedSpectrum(energy)
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
                weight_error, output_error = _errors(spectrum, W, B, A)
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


# --- rank choice -------------------------------------------------------------------
def _check_targets(rank, ratio, energy, tol, allocation):
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
    if allocation is not None and allocation not in _ALLOCATIONS:
        raise ValueError(f"compress_model: allocation must be 'sensitivity', 'global' or "
                         f"'uniform', got {allocation!r}")
    if allocation is not None and ratio is None:
        # It shares out ratio's budget; rank, energy and tol set each layer's own.
        raise ValueError(f"compress_model: allocation applies to ratio only, got "
                         f"allocation={allocation!r} with {given[0]}")


def _rank_from_target(spectrum, energy, tol):
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
                    f"{_prefix(owner)}layer {name!r} ({d}×{k}) cannot be factorized in blocks of "
                    f"{multiple} ranks: d·k/(d+k) = {break_even_rank(d, k):.1f} saves nothing "
                    "beyond that; use a smaller rank_multiple or exclude the layer")
            if allocation == "uniform" and rank_for_ratio(d, k, ratio) < multiple:
                raise ValueError(
                    f"{_prefix(owner)}ratio {ratio} gives layer {name!r} ({d}×{k}) rank "
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
            f"{_prefix(owner)}ratio {ratio} is too small: {smallest} per layer already keeps "
            f"{least / total:.3f} of the weights (layers below that share: "
            f"{preview(small)}); raise the ratio"
            + (" or lower rank_multiple" if multiple > 1 else "")
            + ", or exclude the smallest layers")


def least_parameters(d, k, multiple):
    """The fewest parameters a d×k layer keeps: one block of ``multiple`` ranks,
    or d·k where even that saves nothing (it stays dense)."""
    return multiple * (d + k) if multiple < break_even_rank(d, k) else d * k


def _without_roundoff(energy, n):
    """``energy`` (descending) with the values :func:`_determined` counts as
    round-off set to 0."""
    kept = _determined(energy, n)
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
    _check_targets(rank, ratio, energy, tol, allocation)
    # Read once: a one-pass iterator (a map, a generator) would be empty the
    # second time the patterns are consulted.
    include = _as_patterns("include", include)
    exclude = _as_patterns("exclude", exclude)
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
            ranks[name] = round_rank(_rank_from_target(spectrum, energy, tol), rank_multiple,
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


def _storage_of(tensor):
    """Where ``tensor``'s elements live, or None for a tensor that holds none
    to share with a layer's weight (meta, empty, lazy, or sharded: a
    DTensor's local shard is another matter, refused later), or none torch
    shows: a sparse, mkldnn or nested tensor, or a tensor subclass whose
    elements live in inner tensors (their storage raises)."""
    if (not isinstance(tensor, torch.Tensor) or tensor.is_meta or tensor.numel() == 0
            or nn.parameter.is_lazy(tensor) or is_sharded(tensor)
            or tensor.layout != torch.strided or tensor.is_nested):
        return None
    try:
        return tensor.device, tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a wrapper subclass, say
        return None


def _shared_layers(model, layers):
    """{name: note} for the layers whose module, weight or bias has another
    holder in the model, or whose weight shares its storage with another of
    the model's tensors (a view of a larger parameter)."""
    module_paths, holders, storages = {}, {}, {}
    for path, module in model.named_modules(remove_duplicate=False):
        module_paths.setdefault(id(module), []).append(path)
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(param), []).append(f"{path}.{pname}" if path else pname)
        for tname, tensor in [*module._parameters.items(), *module._buffers.items()]:
            storage = _storage_of(tensor)
            if storage is not None:
                storages.setdefault(storage, []).append(
                    (module, f"{path}.{tname}" if path else tname))
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
    storage = _storage_of(layer.weight)
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
