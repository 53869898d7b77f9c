"""Per-layer spectra for compress_model: the leading left singular vectors of
W (or of W·R, R·Rᵀ = XᵀX, with calibration) and the energy each carries,
from a min(d, k)-sized symmetric eigenproblem in float64; the factors of a
chosen rank and their errors.

Everything that touches a whole d×k matrix in float64 goes a block of rows at
a time (:func:`row_blocks`), so the memory taken stays about one layer's
factors whatever the layer's size.
"""

from __future__ import annotations

import math

import torch

from .nn import break_even_rank


_EPS = torch.finfo(torch.float64).eps
# Eigenvalues of an n×n problem (or one whose entries are sums over n terms)
# below about n·eps·λ₀ are eigh's round-off: their directions are arbitrary.
# Those up to this many times that bound count as such too.
_ROUNDOFF_MARGIN = 10


def determined(lam, n):
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
            for rows in row_blocks(d, k):  # no d×k W·G
                M[rows] = W[rows] @ G @ W.T
        del W
        M = M + M.T
        lam, U = torch.linalg.eigh(M.div_(2))
        del M
        lam = lam.flip(0)
        # Only the columns kept are reordered (copied), not all d of them.
        return lam, U[:, d - min(count, determined(lam, n)):].flip(1)
    # Through the k×k side: C = W·R, CᵀC = V·Σ²·Vᵀ, U = C·V·Σ⁻¹.
    if G is None:
        C = rows_of_w()
    else:
        lam_g, Q = torch.linalg.eigh(G)
        lam_g, Q = lam_g.flip(0), Q.flip(1)
        # G's round-off eigenvalues would add noise directions to C.
        kept = determined(lam_g, n)
        R = Q[:, :kept] * lam_g[:kept].sqrt()  # R·Rᵀ = G
        # C a block of rows at a time: W itself is never whole in float64.
        C = torch.empty(d, kept, dtype=torch.float64, device=device)
        for rows in row_blocks(d, k):
            C[rows] = rows_of_w(rows) @ R
    lam, V = torch.linalg.eigh(C.T @ C)
    lam, V = lam.flip(0), V.flip(1)
    live = min(count, determined(lam, n))
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
        for rows in row_blocks(d, k):
            U[rows] = (C[rows] @ V).div_(sigma)
    if lam.numel() < k:  # C has fewer columns than W where G's rank is below k
        lam = torch.cat([lam, lam.new_zeros(k - lam.numel())])
    return lam, U


# Work on the rows of a d×k weight (W − B·A for the errors) is done over
# blocks of this many bytes of float64 rows, so that its temporaries stay
# small whatever the layer's size.
_BLOCK_BYTES = 1 << 24


def row_blocks(d, k):
    """Slices over the d rows of a d×k float64 matrix, a block of _BLOCK_BYTES at a time."""
    step = max(1, _BLOCK_BYTES // (8 * k))
    return [slice(start, start + step) for start in range(0, d, step)]


class Spectrum:
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
            for rows in row_blocks(d, k):
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
        for rows in row_blocks(*W.shape):
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


class SharedSpectrum:
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


def factor_errors(spectrum, W, B, A):
    """(relative error in weight space, relative error in output space or None)
    of the factors B·A (of any dtype) against ``W``, the layer's weight in float64.
    Both are measured in the spectrum's units (its powers of two), where the
    squares stay in range."""
    A = A.to(device=W.device, dtype=torch.float64)
    G = None if spectrum.gram is None else spectrum.gram.to(W.device)
    if G is not None and spectrum.g_scale != 1.0:
        G = G * spectrum.g_scale
    weight_err = output_err = norm_w = 0.0
    for rows in row_blocks(*W.shape):
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
