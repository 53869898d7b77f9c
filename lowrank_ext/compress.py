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

With ``ratio``, ranks are by default allocated across layers under one total
parameter budget (``allocation="global"``): each further rank of a layer costs
d + k parameters and removes σ_i² / ‖W·R‖² of that layer's relative squared
output error, and the budget goes greedily to the largest removal per parameter.
``allocation="uniform"`` keeps the same ratio in every layer instead.

Every factor is computed before any module is swapped, so a failure leaves the
model exactly as it was.
"""

import fnmatch
import heapq
import math
import numbers

import torch
from torch import nn

from ._workers import Workers
from .nn import LowRankLinear, break_even_rank, rank_for_ratio
from .report import CompressionReport, LayerReport

_ALLOCATIONS = ("global", "uniform")


# --- selecting layers ------------------------------------------------------------
def _as_patterns(name, patterns):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"compress_model: {name} must be a string or a list of strings, got "
                        f"{type(patterns).__name__}") from None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"compress_model: {name} must be a non-empty string or list of strings")
    return patterns


def name_matches(name, pattern):
    """True when a module name matches a glob pattern, in full or as a dotted suffix.

    ``"query"`` matches ``"encoder.layer.0.attention.self.query"`` (peft's
    target_modules habit); ``"encoder.*.dense"`` matches with fnmatch rules.
    """
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def select_names(names, include=None, exclude=None, *, owner="compress_model", what="layer"):
    """The names kept by include/exclude glob patterns; a pattern matching nothing is an error."""
    include = _as_patterns("include", include)
    exclude = _as_patterns("exclude", exclude)
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(name_matches(n, pattern) for n in names):
                raise ValueError(
                    f"{owner}: {label} pattern {pattern!r} matches no {what} "
                    f"(candidates: {_preview(names)})")
    chosen = [n for n in names
              if (include is None or any(name_matches(n, p) for p in include))
              and not any(name_matches(n, p) for p in exclude or ())]
    if not chosen:
        raise ValueError(f"{owner}: include/exclude leave no {what} to compress")
    return chosen


def _preview(names, limit=6):
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


# --- calibration -------------------------------------------------------------------
def _run_calibration(model, calibration, token_mask=None):
    """Run the calibration; for dict batches, ``token_mask[0]`` holds the batch's attention_mask."""
    if callable(calibration):
        calibration(model)
        return
    if isinstance(calibration, (torch.Tensor, dict, tuple)):
        raise TypeError(
            "compress_model: calibration must be a callable fn(model) or an iterable of "
            f"batches, got a single {type(calibration).__name__}; wrap it in a list")
    try:
        batches = iter(calibration)
    except TypeError:
        raise TypeError(
            "compress_model: calibration must be a callable fn(model) or an iterable of "
            f"batches, got {type(calibration).__name__}") from None
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            model(batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        elif isinstance(batch, dict):
            mask = batch.get("attention_mask")
            if token_mask is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                token_mask[0] = mask
            try:
                model(**batch)
            finally:
                if token_mask is not None:
                    token_mask[0] = None
        else:
            raise TypeError(
                "compress_model: a calibration batch must be a tensor, tuple or dict, got "
                f"{type(batch).__name__}")


def collect_input_grams(model, layers, calibration, stages=None):
    """{name: XᵀX in float64} over the inputs each layer sees during ``calibration``.

    When ``stages`` is a list, it receives the layer names in the order of
    their first call, grouped into lists of layers fed the same tensor.

    The model runs in eval mode under no_grad; its modes are restored and the
    hooks removed whatever happens. An exception from the calibration is
    re-raised as RuntimeError naming it.
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
            x = args[0] if args else kwargs.get("input")
            # Holding the tensor itself (not its address) keeps the test exact;
            # inference-mode tensors have no version counter, identity must do.
            version = None if x.is_inference() else x._version
            same = last["key"] is not None and last["key"][0] is x and last["key"][1] == version
            if stages is not None and grams[name] is None:
                if same and stages:
                    stages[-1].append(name)
                else:
                    stages.append([name])
            if not same:
                x64 = x.detach().reshape(-1, k)
                mask = token_mask[0]
                if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                    x64 = x64[mask.reshape(-1).to(x64.device) != 0]
                x64 = x64.to(torch.float64)
                last["key"], last["gram"] = (x, version), x64.T @ x64
            g = last["gram"]
            grams[name] = g.clone() if grams[name] is None else grams[name].add_(g)
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_pre_hook(make_hook(name, module.in_features),
                                                with_kwargs=True)
               for name, module in layers.items()]
    try:
        model.eval()
        with torch.no_grad():
            _run_calibration(model, calibration, token_mask)
    except TypeError as exc:
        if str(exc).startswith("compress_model:"):
            raise
        raise RuntimeError(f"compress_model: the calibration raised TypeError: {exc}") from exc
    except Exception as exc:
        raise RuntimeError(
            f"compress_model: the calibration raised {type(exc).__name__}: {exc}") from exc
    finally:
        last.clear()
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    unseen = [name for name, g in grams.items() if g is None]
    if unseen:
        raise ValueError(
            f"compress_model: the calibration never ran layer(s) {_preview(unseen)}; "
            "give batches that reach every compressed layer, or exclude those layers")
    return grams


# --- per-layer spectra -------------------------------------------------------------
class _Spectrum:
    """Leading left singular vectors of W (or of W·R) and the energy each one carries.

    Computed from a min(d, k)-sized symmetric eigenproblem in float64 rather
    than an SVD of the d×k matrix: several times faster on the CPU, and the
    leading vectors, the only ones kept, are accurate.

    The work runs on ``device`` (default: the weight's); the results are kept
    on the weight's device, so that only one layer at a time occupies
    ``device``.
    """

    def __init__(self, weight, gram, device=None):
        home = weight.device
        device = home if device is None else device
        W = weight.detach().to(device=device, dtype=torch.float64)
        d, k = W.shape
        G = None if gram is None else gram.to(device)
        if d <= k:
            # Left singular vectors of W·R are the eigenvectors of W·G·Wᵀ (d×d).
            M = W @ W.T if G is None else W @ G @ W.T
            lam, U = torch.linalg.eigh((M + M.T) / 2)
            lam, U = lam.flip(0), U.flip(1)
        else:
            # Through the k×k side: C = W·R, CᵀC = V·Σ²·Vᵀ, U = C·V·Σ⁻¹.
            if G is None:
                C = W
            else:
                lam_g, Q = torch.linalg.eigh(G)
                C = W @ (Q * lam_g.clamp_min(0).sqrt())  # R·Rᵀ = G
            lam, V = torch.linalg.eigh(C.T @ C)
            lam, V = lam.flip(0), V.flip(1)
            sigma = lam.clamp_min(0).sqrt()
            # Directions carrying no energy get zero columns: they add nothing to B·A.
            live = sigma > sigma[0] * 1e-12 if sigma.numel() and sigma[0] > 0 else sigma > 0
            U = (C @ V) / torch.where(live, sigma, torch.ones_like(sigma))
            U = U * live
        self.device = device
        self.weight = weight.detach().to(torch.float64)
        self.gram = gram
        self.U = U.to(home)
        self.energy = lam.clamp_min(0).cpu()  # σ_i², descending
        self.total = float(self.energy.sum())

    def factors(self, rank):
        """(B, A) in float64 with B·A the best rank-``rank`` map in this metric."""
        U_r = self.U[:, :rank].to(self.device)
        A = U_r.T @ self.weight.to(self.device)
        return U_r.contiguous(), A.contiguous()

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


def _errors(spectrum, B, A):
    """(relative error in weight space, relative error in output space or None)."""
    W = spectrum.weight.to(spectrum.device)
    diff = W - B @ A
    norm_w = float(torch.linalg.matrix_norm(W))
    weight_error = float(torch.linalg.matrix_norm(diff)) / norm_w if norm_w else 0.0
    output_error = None
    if spectrum.gram is not None:
        G = spectrum.gram.to(W.device)
        ref = float(torch.einsum("ij,jk,ik->", W, G, W))
        err = float(torch.einsum("ij,jk,ik->", diff, G, diff))
        output_error = math.sqrt(max(err, 0.0) / ref) if ref > 0 else 0.0
    return weight_error, output_error


def _spectra(names, layers, grams, owners, workers, device):
    """{name: spectrum} on every rank; each rank decomposes only the layers it owns."""
    spectra, error = {}, None
    try:
        for name in names:
            if owners[name] == workers.rank:
                spectra[name] = _Spectrum(layers[name].weight, grams.get(name), device)
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


def _factors(names, spectra, ranks, owners, workers, shapes):
    """{name: (B, A, weight error, output error)} on every rank, for the layers given."""
    local, error = {}, None
    try:
        for name in names:
            if owners[name] == workers.rank:
                B, A = spectra[name].factors(ranks[name])
                weight_error, output_error = _errors(spectra[name], B, A)
                local[name] = (B, A, weight_error, output_error)
    except Exception as exc:
        error = exc
    workers.all_succeeded(error)
    if not workers.shared:
        return local
    shared = {}
    for name in names:
        (d, k), r, owner = shapes[name], ranks[name], owners[name]
        mine = local.get(name)
        B = workers.share(owner, mine and mine[0], (d, r))
        A = workers.share(owner, mine and mine[1], (r, k))
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
    if allocation not in _ALLOCATIONS:
        raise ValueError(f"compress_model: allocation must be 'global' or 'uniform', got "
                         f"{allocation!r}")


def _rank_from_target(spectrum, energy, tol):
    from .svd import choose_rank

    return choose_rank(spectrum.energy.sqrt(), energy=energy, tol=tol)


def allocate_ranks(spectra, shapes, ratio):
    """Ranks maximising the relative output energy kept under ratio·Σd·k parameters.

    Greedy over the candidate ranks of all layers, best energy per parameter
    first. A layer's σ_i² decrease with i, so each layer gets a prefix; every
    layer gets at least rank 1, and none more than ⌊d·k/(d+k)⌋ (where
    factorizing stops saving anything).
    """
    budget = ratio * sum(d * k for d, k in shapes.values())
    ranks = {name: 1 for name in spectra}
    spent = sum(d + k for d, k in shapes.values())
    heap = []

    def push(name):
        r = ranks[name]
        d, k = shapes[name]
        spectrum = spectra[name]
        if r < min(math.floor(break_even_rank(d, k)), spectrum.energy.numel()):
            gain = float(spectrum.energy[r]) / spectrum.total if spectrum.total else 0.0
            heapq.heappush(heap, (-gain / (d + k), name))

    for name in spectra:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        d, k = shapes[name]
        if spent + d + k > budget:
            continue  # this layer's next rank does not fit; smaller layers may
        ranks[name] += 1
        spent += d + k
        push(name)
    return ranks


# --- the entry point ---------------------------------------------------------------
def compress_model(model, *, ratio=None, rank=None, energy=None, tol=None, calibration=None,
                   include=None, exclude=None, allocation="global", sequential=False,
                   device=None, process_group=None, progress=None):
    """Replace the model's ``nn.Linear`` layers by ``LowRankLinear``, in place.

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
            the padding tokens out of the statistics.
        include, exclude: glob patterns (or lists) on module names, matched in
            full or as a dotted suffix; each must match some Linear layer.
        allocation: with ``ratio``, ``"global"`` (default) shares one budget
            across layers by measured energy per parameter; ``"uniform"`` keeps
            ``ratio`` in every layer.
        sequential: with calibration, whiten each layer with the inputs it sees
            once the layers before it are compressed (one more calibration
            run per group of layers fed the same tensor), so that later layers
            adapt to the error of earlier ones. Slower; off by default.
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
        progress: show a tqdm bar over layers; ``None`` shows it on a terminal only.

    Exactly one of ratio, rank, energy, tol. Layers where factorizing saves
    nothing (rank ≥ d·k/(d+k)) stay dense and the report says so.

    Returns:
        CompressionReport: per layer the rank, parameters and relative errors.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"compress_model: model must be an nn.Module, got {type(model).__name__}")
    _check_targets(rank, ratio, energy, tol, allocation)
    device = _check_device(device)
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ValueError("compress_model: the model has no nn.Linear layer")
    names = select_names(list(linears), include, exclude)
    layers = {name: linears[name] for name in names}
    shapes = {name: tuple(layer.weight.shape) for name, layer in layers.items()}

    if not isinstance(sequential, bool):
        raise TypeError(f"compress_model: sequential must be a bool, got "
                        f"{type(sequential).__name__}")
    if sequential and calibration is None:
        raise ValueError("compress_model: sequential=True needs calibration")
    for name, layer in layers.items():
        if not bool(torch.isfinite(layer.weight).all()):
            raise ValueError(f"compress_model: layer {name!r} has NaN or Inf in its weight")

    workers = Workers(process_group)
    workers.check_same_call((list(shapes.items()), ratio, rank, energy, tol, allocation,
                             sequential, calibration is not None))
    owners = workers.assign(shapes)
    stages = []
    grams = (collect_input_grams(model, layers, calibration, stages)
             if calibration is not None else {})
    for gram in grams.values():
        workers.sum_(gram)
    if sequential:
        workers.check_same_call(stages)

    bar = tqdm(total=len(layers), desc="compress", unit="layer", leave=False,
               disable=None if progress is None else not progress)
    spectra = _spectra(names, layers, grams, owners, workers, device)
    if not sequential:
        bar.update(len(layers))

    if ratio is not None and allocation == "global":
        ranks = allocate_ranks(spectra, shapes, ratio)
    elif ratio is not None:
        ranks = {n: rank_for_ratio(*shapes[n], ratio) for n in layers}
    elif rank is not None:
        ranks = {n: int(rank) for n in layers}
    else:
        ranks = {n: _rank_from_target(spectra[n], energy, tol) for n in layers}
    factorized = [n for n in names if ranks[n] < break_even_rank(*shapes[n])]

    def swap(name, new):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)

    records, replacements = {}, {}
    for name in names:
        if name not in factorized:
            d, k = shapes[name]
            records[name] = LayerReport(name, (d, k), None, d * k, d * k, 0.0,
                                        0.0 if name in grams else None,
                                        note=f"dense: rank {ranks[name]} >= d·k/(d+k) = "
                                             f"{break_even_rank(d, k):.1f} saves nothing")

    def replace(found):
        for name, (B, A, weight_error, output_error) in found.items():
            layer = layers[name]
            (d, k), r = shapes[name], ranks[name]
            dtype, home = layer.weight.dtype, layer.weight.device
            bias = None if layer.bias is None else layer.bias.detach()
            new = LowRankLinear.from_factors(A.to(device=home, dtype=dtype),
                                             B.to(device=home, dtype=dtype), bias)
            new.train(layer.training)
            replacements[name] = new
            records[name] = LayerReport(name, (d, k), r, d * k, r * (d + k), weight_error,
                                        output_error)

    if not sequential:
        replace(_factors(factorized, spectra, ranks, owners, workers, shapes))
    else:
        # Earlier stages go into the model as they are done, so that the next
        # calibration run sees their error; any failure puts the originals back.
        done = False
        try:
            for index, group in enumerate(stages):
                stage = [n for n in group if n in factorized]
                if not stage:
                    bar.update(len(group))
                    continue
                if index == 0:
                    stage_grams = grams
                else:
                    stage_grams = collect_input_grams(
                        model, {n: layers[n] for n in stage}, calibration)
                    for gram in stage_grams.values():
                        workers.sum_(gram)
                bar.set_postfix_str(stage[0], refresh=False)
                stage_spectra = _spectra(stage, layers, stage_grams, owners, workers, device)
                replace(_factors(stage, stage_spectra, ranks, owners, workers, shapes))
                for name in stage:
                    swap(name, replacements[name])
                bar.update(len(group))
            done = True
        finally:
            if not done:
                for name in replacements:
                    swap(name, layers[name])
    bar.close()

    # Every factor exists: only now touch the model.
    for name, new in replacements.items():
        swap(name, new)
    return CompressionReport([records[n] for n in layers], calibrated=calibration is not None)


def _check_device(device):
    if device is None:
        return None
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise TypeError(f"compress_model: device must be a torch.device, str or int, got "
                        f"{type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"compress_model: device {device!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"compress_model: device {str(device)!r} is not available "
                         "(torch.cuda.is_available() is False)")
    if device.type == "meta":
        raise ValueError("compress_model: device 'meta' holds no data to factorize on")
    return device
