"""Truncated SVD: the rank-r factors ``W ≈ B·A`` and the choice of r.

The factorization itself is the op ``torch.ops.lowrank_ext.svd_truncate``
(C++ over ATen's SVD: LAPACK on the CPU, cuSOLVER on CUDA). This module picks
the rank from an energy or error target and offers a randomized method.
Under a ``torch.func`` transform the same factors come from torch ops that
the transform differentiates: it cannot see through the op.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor

from . import _checks, _functorch
from ._amp import outside_autocast
from ._checks import holds_values, is_int
from ._fallback import factors_from_svd, svd_operand
from ._library import ops

_METHODS = ("exact", "randomized")
# Relative slack on the energy and error targets (fractions of Σσ²), so that
# a target met exactly in real arithmetic is not missed by rounding.
_RANK_SLACK = 1e-12
# Extra columns of the randomized range finder beyond the rank (Halko et al.).
_OVERSAMPLE = 10


def _check_criteria(fn, rank, energy, tol, *, takes_rank=True):
    named = (("rank", rank),) if takes_rank else ()
    named += (("energy", energy), ("tol", tol))
    given = [name for name, value in named if value is not None]
    if len(given) != 1:
        seen = " and ".join(given) if given else "none"
        choices = "rank, energy or tol" if takes_rank else "energy or tol"
        raise ValueError(f"{fn}: give exactly one of {choices}, got {seen}")
    if rank is not None and not is_int(rank):
        raise TypeError(f"{fn}: rank must be an int, got {type(rank).__name__}")
    for name, value in (("energy", energy), ("tol", tol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    if energy is not None and not 0.0 < energy <= 1.0:  # NaN fails too
        raise ValueError(f"{fn}: energy must be in (0, 1], got {energy}")
    if tol is not None and not tol >= 0.0:
        raise ValueError(f"{fn}: tol must be >= 0, got {tol}")
    # As floats; an int past float's range (10**400) is a tol of infinity.
    return (None if energy is None else float(energy),
            None if tol is None else _as_float(tol))


def _as_float(value):
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def choose_rank(S: Tensor, *, energy: float | None = None, tol: float | None = None) -> int:
    """The smallest rank meeting a target, from singular values ``S`` (descending).

    ``energy`` in (0, 1]: the smallest r whose leading singular values hold that
    fraction of Σσ². ``tol`` ≥ 0: the smallest r with ‖W − W_r‖_F ≤ tol·‖W‖_F,
    where ‖W − W_r‖_F = √Σ_{i>r} σ_i² (Eckart–Young). Give exactly one. A zero
    matrix gets rank 1. Both allow for rounding: ``energy`` may miss Σσ² by
    1e-12 of itself (so ``energy=1`` drops singular values below about
    1e-6·‖W‖_F, the rounding of values computed through squares, as
    eigenvalues of XᵀX are), and both ignore a tail of up to
    4·√n·eps·‖W‖_F, the rounding level of an SVD in ``S``'s dtype (float32's
    eps for float16, bfloat16 and float8 ``S``, as no SVD runs in those), so
    ``tol=0`` and ``energy=1`` give the numerical rank, not the count of
    singular values that rounding left above zero.
    """
    energy, tol = _check_criteria("choose_rank", None, energy, tol, takes_rank=False)
    if not isinstance(S, torch.Tensor):
        raise TypeError(f"choose_rank: S must be a Tensor, got {type(S).__name__}")
    if S.dim() != 1 or S.numel() == 0:
        raise ValueError(f"choose_rank: S must be a non-empty 1-D tensor, got shape {list(S.shape)}")
    if not S.is_floating_point():
        raise TypeError(f"choose_rank: S must be floating point, got {_checks.dtype_name(S.dtype)}")
    if S.is_meta:
        raise ValueError("choose_rank: S is on the meta device and holds no values to "
                         "choose a rank from")
    s = S.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("choose_rank: S must be finite and non-negative")
    if bool((s[1:] > s[:-1]).any()):  # the ranks below count leading values
        raise ValueError("choose_rank: S must be in descending order, as svdvals gives it")
    # Both targets are ratios of sums of squares: scaling by the largest value
    # keeps the squares of finite values from overflowing (σ ≈ 1e200).
    top = float(s.max())
    s2 = (s / top) ** 2 if top > 0 else s
    # Both targets bound the tail: tail[r-1] = Σ_{i>r} σ_i², summed from the
    # small end so that each tail is accurate to its own size, and the total
    # is the same sum run to the end. A forward cumsum against a pairwise
    # total disagreed by n·eps, more than the slack, and then no rank met
    # energy = 1; tail[-1] = 0 now always meets either bound.
    upto = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # Σ_{i≥r} σ_i²
    total = float(upto[0])
    if total == 0.0:
        return 1
    tail = torch.cat([upto[1:], upto.new_zeros(1)])
    # Rounding in S itself is no error to meet: its floor, about n·eps² of
    # Σσ² (with a margin), makes tol = 0 ("exact") and energy = 1 give the
    # numerical rank (the SVD of a float32 rank-1 64 × 1024 matrix leaves
    # values of 1e-6·‖W‖_F, 5e-12 of Σσ² together, more than the slack), while
    # a small positive tol stays as strict as S's precision allows (1e-7 of a
    # float64 W is kept). A half S was rounded from an SVD run in float32 at
    # least (none runs in half), and rounding the values does not lift the
    # tail: its eps would allow 6 % of Σσ² for 64 bfloat16 values.
    eps = min(torch.finfo(S.dtype).eps, torch.finfo(torch.float32).eps)
    floor = 16 * S.numel() * eps ** 2
    if energy is not None:
        # kept = total − tail ≥ energy·total·(1 − slack), solved for the tail.
        ok = tail <= (1.0 - energy * (1.0 - _RANK_SLACK) + floor) * total
    else:
        ok = tail <= (tol * tol * (1.0 + _RANK_SLACK) + floor) * total
    return int(torch.nonzero(ok)[0, 0]) + 1


def svd_truncate(W: Tensor, rank: int | None = None, *, energy: float | None = None,
                 tol: float | None = None, balanced: bool = False, method: str = "exact",
                 niter: int = 2, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Factor ``W`` (d, k) as ``B·A`` with B (d, r) and A (r, k), by truncated SVD.

    Exactly one of:
        rank: r itself, in [1, min(d, k)];
        energy: keep the smallest r holding this fraction of Σσ², in (0, 1];
        tol: the smallest r with ‖W − B·A‖_F ≤ tol·‖W‖_F, tol ≥ 0.

    ``balanced=False`` gives the seed notebook's ``B = U_r·diag(S_r)``, ``A = V_rᵀ``;
    ``balanced=True`` splits the singular values evenly:
    ``B = U_r·diag(√S_r)``, ``A = diag(√S_r)·V_rᵀ``.

    ``method="randomized"`` (rank only) uses ``torch.svd_lowrank`` with ``niter``
    power iterations; its random draws come from ``generator`` when given, so
    the result is reproducible without touching the global RNG.

    float16/bfloat16 ``W`` is factorized in float32 and returned in W's dtype.
    ``tol`` chooses the rank from that float32 SVD; where rounding the factors
    to W's dtype takes their error past ``tol``, a UserWarning says so.
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"svd_truncate: W must be a Tensor, got {type(W).__name__}")
    energy, tol = _check_criteria("svd_truncate", rank, energy, tol)
    if method not in _METHODS:
        raise ValueError(f"svd_truncate: method must be 'exact' or 'randomized', got {method!r}")
    if not isinstance(balanced, bool):
        raise TypeError(f"svd_truncate: balanced must be a bool, got {type(balanced).__name__}")
    # Checked whatever the method, so that a bad value is not accepted only
    # until the method changes.
    if not is_int(niter):
        raise TypeError(f"svd_truncate: niter must be an int, got {type(niter).__name__}")
    if niter < 0:
        raise ValueError(f"svd_truncate: niter must be >= 0, got {niter}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"svd_truncate: generator must be a torch.Generator, got {type(generator).__name__}")
    if rank is not None and not -2**63 <= rank < 2**63:
        # Past the op's int64, it would fail to convert rank with a long
        # message naming no argument: give the errors it would give.
        _checks.check_svd_matrix(W)
        _checks.check_svd_rank(W, rank)
    if method == "randomized":
        if rank is None:
            raise ValueError("svd_truncate: method='randomized' needs rank, not energy or tol")
        # Its products in W's dtype, as the exact method's, also under autocast.
        with outside_autocast(W.device.type):
            return _randomized(W, int(rank), balanced, int(niter), generator)
    if rank is None:
        _checks.check_svd_matrix(W)
        if _batched(W):
            raise ValueError(
                f"svd_truncate: {'energy' if energy is not None else 'tol'} chooses each "
                "matrix's rank from its singular values, which differ across a torch.vmap "
                "batch (the factors would differ in shape); give rank under vmap")
        if W.is_meta:
            raise ValueError(
                f"svd_truncate: {'energy' if energy is not None else 'tol'} chooses the rank "
                "from W's singular values, but W is on the meta device and holds no values; "
                "give rank instead")
        _checks.check_svd_finite(W)
        # W scaled as the op scales it (svd_operand): the rank depends on
        # ratios of σ only, and σ₁ of a finite W can be past its dtype's range.
        S = torch.linalg.svdvals(svd_operand(W)[0])
        rank = choose_rank(S, energy=energy, tol=tol)
    grad_wanted = W.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        if grad_wanted:
            # Traced, the op would give factors that claim a gradient and pass
            # none back to W: the differentiable form runs outside the graph.
            from ._svd_outside_compile import differentiable_outside_compile

            return differentiable_outside_compile(W, int(rank), balanced)
        return ops.svd_truncate.default(W, int(rank), balanced)
    if _functorch.transforms_active() is not None:
        # torch.func cannot see through the op: the same factors from torch
        # ops it differentiates. (Elsewhere a gradient or a forward-mode
        # tangent takes the same route in the op's autograd kernel.)
        factors = _differentiable(W, int(rank), balanced)
    else:
        factors = ops.svd_truncate.default(W, int(rank), balanced)
    if tol is not None and W.dtype in _ROUNDED_TYPES and holds_values(W):
        _warn_if_rounding_misses(W, S, int(rank), tol, factors)
    return factors


# Factors rounded to these dtypes from a float32 SVD can miss a tol that the
# SVD's factors meet: by about their eps times ‖W‖_F.
_ROUNDED_TYPES = (torch.float16, torch.bfloat16)


def _warn_if_rounding_misses(W, S, rank, tol, factors):
    """Warn, as compress_model notes it in its report, where ``tol`` chose a
    rank whose factors meet it before rounding to W's dtype and miss it after."""
    from .compress import rounding_note

    s = S.detach().to(device="cpu", dtype=torch.float64)
    exact = float(s[rank:].square().sum().div(s.square().sum()).sqrt())
    B, A = (_values(f).detach().float() for f in factors)
    Wf = _values(W).detach().float()
    error = float(torch.linalg.matrix_norm(Wf - B @ A) / torch.linalg.matrix_norm(Wf))
    note = rounding_note(W.dtype, exact, error, None, tol)
    if note:
        warnings.warn(f"svd_truncate: rank {rank}, chosen for tol={tol} from the float32 "
                      f"SVD: {note}. A smaller tol gives a larger rank; a float32 W keeps "
                      "the factors unrounded", stacklevel=3)


def scaled_singular_values(W):
    """(S, root): the singular values of W in float64 divided by root², a power
    of two (:func:`svd_operand`), so that σ₁ of a finite W stays in range
    (it need not: 1e308 in every entry). The rank a target chooses from S is
    W's; S·root·root gives σ back where it is in range."""
    Ws, root = svd_operand(W.double())
    return torch.linalg.svdvals(Ws), root


def _batched(t):
    """Whether ``t`` is batched by torch.vmap (under any other torch.func wrappers)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        if torch._C._functorch.is_batchedtensor(t):
            return True
        t = torch._C._functorch.get_unwrapped(t)
    return False


def _values(t):
    """The tensor under every torch.func wrapper of ``t``: the values a check
    reads (vmap refuses a Python bool of a batched tensor; the check then
    covers every sample at once)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _differentiable(W, rank, balanced):
    """The op's factors from torch ops that a torch.func transform sees: it
    cannot see through the op, which has no autograd formula of its own, and
    took its gradients as zero. The checks, the SVD and the factors are the
    op's (as in _fallback.svd_truncate), so values and signs agree with it."""
    _checks.check_svd_matrix(W)
    _checks.check_svd_rank(W, rank)
    _checks.check_svd_finite(_values(W))
    Ws, root = svd_operand(W)
    U, S, Vh = torch.linalg.svd(Ws, full_matrices=False)
    # The range check reads the values, under any wrapper.
    return factors_from_svd(U[:, :rank], S[:rank], Vh[:rank], balanced, W.dtype, root, _values)


def _randomized(W, rank, balanced, niter, generator):
    _checks.check_svd_matrix(W)
    _checks.check_svd_rank(W, rank)
    if W.is_meta:
        raise ValueError("svd_truncate: method='randomized' samples W's values, but W is on the "
                         "meta device and holds no values; method='exact' gives the shapes")
    _checks.check_svd_finite(_values(W))  # under vmap, every sample at once
    Wc, root = svd_operand(W)
    q = min(rank + _OVERSAMPLE, *W.shape)
    if generator is None:
        U, S, V = torch.svd_lowrank(Wc, q=q, niter=niter)
    else:
        # svd_lowrank draws from the global RNG of W's device: seed a forked
        # copy of that one generator from the caller's, so results are
        # reproducible and no global state is left changed (torch.manual_seed
        # would also reseed every accelerator).
        try:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        except RuntimeError as exc:
            if not _batched(W):
                raise
            # vmap(randomness="different") draws a seed per matrix, which no
            # one generator state can stand for.
            raise ValueError(
                "svd_truncate: a generator cannot seed torch.vmap(randomness='different'), "
                "whose draws differ per matrix; use randomness='same', or no generator") from exc
        with _forked_rng(W.device):
            _seed_device(W.device, seed)
            U, S, V = torch.svd_lowrank(Wc, q=q, niter=niter)
    return factors_from_svd(U[:, :rank], S[:rank], V[:, :rank].T, balanced, W.dtype, root,
                            _values)


def _forked_rng(device):
    """fork_rng restoring the global generator that draws on ``device``, and only it."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _seed_device(device, seed):
    """Seed the global generator that draws on ``device`` alone."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
        return
    module = torch.get_device_module(device.type)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)  # the current device's generator only
    else:
        module.manual_seed(seed)
