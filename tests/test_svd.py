"""svd_truncate and choose_rank: optimality, rank choice, forms, reproducibility."""

import math
import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as lx


def _low_rank(d, k, r, dtype=torch.float64, noise=0.0):
    W = torch.randn(d, r, dtype=dtype) @ torch.randn(r, k, dtype=dtype)
    return W + noise * torch.randn(d, k, dtype=dtype)


def test_seed_example_recovers_rank_two_exactly():
    W = _low_rank(10, 10, 2, dtype=torch.float32)
    B, A = lx.svd_truncate(W, rank=2)
    assert B.shape == (10, 2) and A.shape == (2, 10)
    assert B.numel() + A.numel() == 40
    torch.testing.assert_close(B @ A, W, rtol=1e-5, atol=1e-5)
    x, b = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(lx.lowrank_linear(x, A, B, b), W @ x + b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (30, 30)])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_eckart_young_error(shape, rank):
    """‖W − B·A‖_F equals √Σ_{i>r} σ_i², the best any rank-r matrix can do."""
    W = torch.randn(*shape, dtype=torch.float64)
    S = torch.linalg.svdvals(W)
    B, A = lx.svd_truncate(W, rank=rank)
    err = torch.linalg.matrix_norm(W - B @ A)
    torch.testing.assert_close(err, S[rank:].square().sum().sqrt(), rtol=1e-10, atol=1e-10)


def test_forms_seed_and_balanced():
    W = torch.randn(9, 7, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    B, A = lx.svd_truncate(W, rank=3)
    # A has orthonormal rows (V_rᵀ); B carries the singular values.
    torch.testing.assert_close(A @ A.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.vector_norm(B, dim=0), S[:3])
    Bb, Ab = lx.svd_truncate(W, rank=3, balanced=True)
    torch.testing.assert_close(Bb @ Ab, B @ A)
    torch.testing.assert_close(torch.linalg.vector_norm(Bb, dim=0), S[:3].sqrt())
    torch.testing.assert_close(torch.linalg.vector_norm(Ab, dim=1), S[:3].sqrt())


def test_full_rank_reconstructs_and_zero_matrix_works():
    W = torch.randn(5, 8, dtype=torch.float64)
    B, A = lx.svd_truncate(W, rank=5)
    torch.testing.assert_close(B @ A, W)
    Z = torch.zeros(4, 6)
    B, A = lx.svd_truncate(Z, rank=2)
    assert torch.count_nonzero(B @ A) == 0
    assert lx.svd_truncate(Z, energy=0.9)[0].shape == (4, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_factorized_in_float32(dtype):
    W = _low_rank(16, 12, 3, dtype=torch.float32).to(dtype)
    B, A = lx.svd_truncate(W, rank=3)
    assert B.dtype == dtype and A.dtype == dtype
    ref_B, ref_A = lx.svd_truncate(W.float(), rank=3)
    torch.testing.assert_close(B.float() @ A.float(), ref_B @ ref_A, rtol=2e-2, atol=2e-2)


def _energy_rank(S, energy):
    s2 = [float(s) ** 2 for s in S]
    total, acc = sum(s2), 0.0
    for r, v in enumerate(s2, start=1):
        acc += v
        if acc >= energy * total * (1 - 1e-12):
            return r
    return len(s2)


@pytest.mark.parametrize("energy", [0.1, 0.5, 0.9, 0.99, 1.0])
def test_energy_picks_the_smallest_rank_holding_the_fraction(energy):
    W = torch.randn(20, 15, dtype=torch.float64) * torch.logspace(0, -2, 15, dtype=torch.float64)
    S = torch.linalg.svdvals(W)
    r = lx.choose_rank(S, energy=energy)
    assert r == _energy_rank(S, energy)
    kept = S[:r].square().sum() / S.square().sum()
    assert kept >= energy * (1 - 1e-12)
    if r > 1:
        assert S[:r - 1].square().sum() / S.square().sum() < energy
    B, A = lx.svd_truncate(W, energy=energy)
    assert B.shape[1] == r


@pytest.mark.parametrize("tol", [0.0, 0.01, 0.1, 0.5, 2.0])
def test_tol_picks_the_smallest_rank_within_the_error(tol):
    W = torch.randn(18, 14, dtype=torch.float64) * torch.logspace(0, -3, 14, dtype=torch.float64)
    B, A = lx.svd_truncate(W, tol=tol)
    r = B.shape[1]
    norm = torch.linalg.matrix_norm(W)
    assert torch.linalg.matrix_norm(W - B @ A) <= tol * norm * (1 + 1e-9) or r == min(W.shape)
    if r > 1:
        B1, A1 = lx.svd_truncate(W, rank=r - 1)
        assert torch.linalg.matrix_norm(W - B1 @ A1) > tol * norm


def test_energy_one_keeps_all_but_its_slack():
    # diag(1, 1e-7) in float64: σ₂² = 1e-14 of Σσ² is within energy's 1e-12
    # slack, which tol=0 does not give.
    W = torch.diag(torch.tensor([1.0, 1e-7], dtype=torch.float64))
    assert lx.svd_truncate(W, energy=1.0)[0].shape[1] == 1
    assert lx.svd_truncate(W, tol=0.0)[0].shape[1] == 2


def test_energy_one_finds_the_numerical_rank():
    W = _low_rank(10, 10, 2, dtype=torch.float32)
    assert lx.svd_truncate(W, energy=1.0)[0].shape[1] == 2


def test_a_small_tol_stays_strict_in_float64():
    S = torch.tensor([1.0, 5e-7, 1e-9], dtype=torch.float64)
    assert lx.choose_rank(S, tol=1e-6) == 1
    assert lx.choose_rank(S, tol=1e-7) == 2  # the tail past rank 1 is 5e-7 > 1e-7


def test_tol_zero_finds_the_numerical_rank_as_energy_one_does():
    # float32 leaves singular values of about 1e-7·‖W‖ past the true rank.
    for W in (_low_rank(10, 10, 2, dtype=torch.float32), torch.ones(5, 5)):
        expected = lx.svd_truncate(W, energy=1.0)[0].shape[1]
        assert lx.svd_truncate(W, tol=0.0)[0].shape[1] == expected == torch.linalg.matrix_rank(W)


def test_randomized_is_reproducible_and_close_to_exact():
    W = _low_rank(60, 40, 5, noise=1e-3)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    state = torch.get_rng_state()
    B1, A1 = lx.svd_truncate(W, rank=5, method="randomized", generator=g1)
    B2, A2 = lx.svd_truncate(W, rank=5, method="randomized", generator=g2)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was touched"
    assert torch.equal(B1, B2) and torch.equal(A1, A2)
    Be, Ae = lx.svd_truncate(W, rank=5)
    err_rand = torch.linalg.matrix_norm(W - B1 @ A1)
    err_exact = torch.linalg.matrix_norm(W - Be @ Ae)
    assert err_rand <= err_exact * 1.05 + 1e-12
    Bb, Ab = lx.svd_truncate(W, rank=5, method="randomized", balanced=True, niter=4,
                             generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(Bb @ Ab, Be @ Ae, rtol=1e-4, atol=1e-4)


def test_a_generator_seeds_no_accelerator_rng(monkeypatch):
    """With a generator, only a forked copy of the CPU generator is seeded: torch.manual_seed
    would also reseed every accelerator's (CUDA's, queued until it starts)."""
    def reseeds(*args, **kwargs):
        raise AssertionError("a global generator was reseeded")

    for name in ("manual_seed", "seed"):
        monkeypatch.setattr(torch, name, reseeds)
        monkeypatch.setattr(torch.cuda, name + "_all", reseeds)
    W = _low_rank(30, 20, 3)
    B, A = lx.svd_truncate(W, rank=3, method="randomized",
                           generator=torch.Generator().manual_seed(7))
    monkeypatch.undo()
    B2, A2 = lx.svd_truncate(W, rank=3, method="randomized",
                             generator=torch.Generator().manual_seed(7))
    assert torch.equal(B, B2) and torch.equal(A, A2)


def test_randomized_under_vmap_factors_each_matrix():
    torch.manual_seed(0)
    Ws = torch.stack([_low_rank(12, 9, 2, noise=1e-4) for _ in range(3)])
    B, A = torch.vmap(lambda W: lx.svd_truncate(W, rank=2, method="randomized", niter=4),
                      randomness="different")(Ws)
    assert B.shape == (3, 12, 2) and A.shape == (3, 2, 9)
    for W, b, a in zip(Ws, B, A):
        best = torch.linalg.svdvals(W.double())[2:].square().sum().sqrt()
        assert torch.linalg.matrix_norm(W - b @ a) <= 1.05 * float(best) + 1e-6
    # A generator seeds one draw for every matrix (randomness="same"); with draws that
    # differ per matrix it cannot, and says so (it was vmap's .item() error).
    g = torch.Generator().manual_seed(1)
    B, A = torch.vmap(lambda W: lx.svd_truncate(W, rank=2, method="randomized", generator=g),
                      randomness="same")(Ws)
    assert B.shape == (3, 12, 2)
    with pytest.raises(ValueError, match="a generator cannot seed torch.vmap"):
        torch.vmap(lambda W: lx.svd_truncate(W, rank=2, method="randomized", generator=g),
                   randomness="different")(Ws)
    with pytest.raises(ValueError, match="svd_truncate: W contains NaN or Inf"):
        torch.vmap(lambda W: lx.svd_truncate(W, rank=2, method="randomized"),
                   randomness="different")(torch.full((2, 4, 4), float("nan")))


@pytest.mark.parametrize("balanced", [False, True])
def test_gradients_through_the_factors_with_no_deprecated_fallback(balanced):
    """A W that requires grad is factored by differentiable torch ops: the op has no
    autograd formula, and torch backpropagated through its kernels' internals with a
    deprecation warning ("may lead to silently incorrect behavior")."""
    torch.manual_seed(0)
    W = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        B, A = lx.svd_truncate(W, rank=2, balanced=balanced)
        (B @ A).square().sum().backward()
    W_ref = W.detach().clone().requires_grad_()
    U, S, Vh = torch.linalg.svd(W_ref, full_matrices=False)
    ((U[:, :2] * S[:2]) @ Vh[:2]).square().sum().backward()
    torch.testing.assert_close(W.grad, W_ref.grad, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the op itself, giving the same factors
        B0, A0 = lx.svd_truncate(W, rank=2, balanced=balanced)
    torch.testing.assert_close(B.detach(), B0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.detach(), A0, rtol=1e-12, atol=1e-12)


def test_choose_rank_on_a_zero_spectrum_is_one():
    assert lx.choose_rank(torch.zeros(5), energy=0.5) == 1
    assert lx.choose_rank(torch.zeros(5), tol=0.0) == 1


def test_svd_truncate_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    W = torch.randn(30, 20, dtype=torch.float64)
    B, A = lx.svd_truncate(W.cuda(), rank=4)
    assert B.is_cuda and A.is_cuda
    Bc, Ac = lx.svd_truncate(W, rank=4)
    torch.testing.assert_close((B @ A).cpu(), Bc @ Ac)
    assert math.isclose(float(torch.linalg.matrix_norm(W - (B @ A).cpu())),
                        float(torch.linalg.svdvals(W)[4:].square().sum().sqrt()), rel_tol=1e-9)


def test_meta_tensors_give_shapes_by_rank_and_clear_errors_otherwise():
    W = torch.empty(12, 8, device="meta")
    B, A = lx.svd_truncate(W, rank=3)  # shape propagation, as any op on meta
    assert B.is_meta and A.is_meta and B.shape == (12, 3) and A.shape == (3, 8)
    # One that requires grad (an nn.Linear weight built on meta) too, and a fake one.
    B, A = lx.svd_truncate(W.requires_grad_(), rank=3, balanced=True)
    assert B.is_meta and B.shape == (12, 3) and A.shape == (3, 8)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.warns(UserWarning, match="gives factors without a gradient"):
        B, A = lx.svd_truncate(torch.empty(12, 8, requires_grad=True), rank=3)
    assert B.shape == (12, 3) and A.shape == (3, 8)
    for criterion in ({"energy": 0.9}, {"tol": 0.1}):
        (name,) = criterion
        with pytest.raises(ValueError, match=f"svd_truncate: {name} chooses the rank from W's "
                                             "singular values, but W is on the meta device"):
            lx.svd_truncate(W, **criterion)
    with pytest.raises(ValueError, match="choose_rank: S is on the meta device"):
        lx.choose_rank(torch.ones(4, device="meta"), energy=0.9)


def test_rank_targets_hold_for_singular_values_whose_squares_overflow():
    S = torch.tensor([3e200, 2e200, 1e200, 1e199], dtype=torch.float64)
    small = S / 1e200
    for target in ({"energy": 0.9}, {"energy": 0.99}, {"tol": 0.1}, {"tol": 0.5}):
        assert lx.choose_rank(S, **target) == lx.choose_rank(small, **target)
    W = torch.randn(8, 6, dtype=torch.float64)
    B, A = lx.svd_truncate(W * 1e200, energy=0.9)
    assert B.shape[1] == lx.svd_truncate(W, energy=0.9)[0].shape[1]


@pytest.mark.parametrize("energy", [1.0, 1 - 1e-13])
def test_energy_holds_on_a_long_spectrum_whose_tail_rounding_hides(energy):
    # 30000 values of 1e-8 add 3e-12 to Σσ², below the rounding of a running
    # sum from 1 but above the 1e-12 slack: a rank must still be found, and
    # hold the energy.
    S = torch.cat([torch.ones(1, dtype=torch.float64),
                   torch.full((30000,), 1e-8, dtype=torch.float64)])
    r = lx.choose_rank(S, energy=energy)
    s2 = [float(s) ** 2 for s in S]
    total = math.fsum(s2)
    assert math.fsum(s2[:r]) >= energy * total * (1 - 1e-12)
    # The smallest such rank, but for rounding: at energy 1 the rank before
    # meets the target to 3e-24 of Σσ², a tie no float64 sum resolves.
    assert r == 1 or math.fsum(s2[:r - 1]) < energy * total * (1 - 1e-12) + 1e-15 * total


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tol", [0.0, 0.01, 0.1])
def test_tol_holds_for_half_precision_singular_values(dtype, tol):
    # Rounding σ to a half type does not lift the tail: the floor is that of
    # the float32 SVD they came from, not 16·n·eps² of the half type (of Σσ²
    # for 1024 values: 1.6 % in float16, all of it in bfloat16).
    S = torch.linspace(1, 0.3, 1024).to(dtype)
    r = lx.choose_rank(S, tol=tol)
    s2 = S.double() ** 2
    assert float(s2[r:].sum().sqrt()) <= tol * float(s2.sum().sqrt()) * (1 + 1e-9)
    assert r == lx.choose_rank(S.float(), tol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tol_missed_by_rounding_the_factors_to_a_half_type_is_a_warning(dtype):
    # The rank is chosen from the float32 SVD; rounding its factors to the
    # half type adds about eps·‖W‖_F, which took them past tol unannounced.
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(64, 48, generator=g, dtype=torch.float64)
         @ torch.diag(torch.logspace(0, -2, 48, dtype=torch.float64))
         @ torch.randn(48, 48, generator=g, dtype=torch.float64)).to(dtype)

    def error(B, A):
        Wd = W.double()
        return float(torch.linalg.matrix_norm(Wd - B.double() @ A.double())
                     / torch.linalg.matrix_norm(Wd))

    missed = met = 0
    for tol in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            B, A = lx.svd_truncate(W, tol=tol)
        ours = [w for w in caught if "svd_truncate: rank" in str(w.message)]
        # Measured in float64 here; the warning's own measure is float32.
        if error(B, A) > tol * 1.001:
            missed += 1
            assert len(ours) == 1, tol
            message = str(ours[0].message)
            assert f"chosen for tol={tol} from the float32 SVD: rounding the factors to " \
                   f"{str(dtype).split('.')[1]}, as stored, leaves a relative error of" in message
        elif error(B, A) < tol * 0.999:
            met += 1
            assert not ours, tol
    assert missed and met  # both cases seen
    layer = nn.Linear(48, 64, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(W)
    with pytest.warns(UserWarning, match="svd_truncate: rank .* above tol=0.001"):
        lx.LowRankLinear.from_linear(layer, tol=0.001)


@pytest.mark.parametrize("call, exc, message", [
    (lambda: lx.choose_rank(torch.ones(3), energy=0.5, tol=0.1), ValueError,
     "choose_rank: give exactly one of energy or tol, got energy and tol"),
    (lambda: lx.svd_truncate(torch.randn(2, 3, 3), rank=2**70), ValueError,
     "svd_truncate: W must be 2-D (d, k), got shape [2, 3, 3]"),
    (lambda: lx.svd_truncate(torch.empty(3, 3, device="meta"), rank=2, method="randomized"),
     ValueError, "svd_truncate: method='randomized' samples W's values, but W is on the meta "
                 "device and holds no values; method='exact' gives the shapes"),
    (lambda: lx.svd_truncate(torch.randn(4, 4), rank=1, method="randomized", niter="2"),
     TypeError, "svd_truncate: niter must be an int, got str"),
    (lambda: lx.svd_truncate(torch.randn(4, 4), rank=1, niter=-1), ValueError,
     "svd_truncate: niter must be >= 0, got -1"),
    (lambda: lx.svd_truncate(torch.randn(4, 4), rank=1, generator="x"), TypeError,
     "svd_truncate: generator must be a torch.Generator, got str"),
], ids=["choose_rank-both", "3d-huge-rank", "meta-randomized",
        "niter-str", "niter-negative-exact", "generator-str-exact"])
def test_bad_arguments_are_named_in_one_line(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message


def test_bfloat16_factors_past_its_range_suggest_float64():
    # bfloat16 has float32's range: a float32 W would not hold them either.
    W = torch.full((40, 4), 3e38, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="beyond bfloat16's range .*; pass balanced=True "
                                         "or give a float64 W$"):
        lx.svd_truncate(W, rank=1)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_float16_factors_past_its_range_are_an_error_not_inf(method):
    from lowrank_ext import _fallback
    from lowrank_ext._library import ops

    W = torch.full((16, 16), 60000.0, dtype=torch.float16)  # σ_1 = 960000, B's entries 240000
    before = W.clone()
    message = ("svd_truncate: factor B has entries up to 240000, beyond float16's range "
               "(largest 65504); pass balanced=True or give a float32 W")
    with pytest.raises(ValueError) as info:
        lx.svd_truncate(W, rank=1, method=method)
    assert str(info.value) == message
    if method == "exact":  # the compiled op and the fallback word it alike
        for op in (ops.svd_truncate, _fallback.svd_truncate):
            with pytest.raises(ValueError) as info:
                op(W, 1, False)
            assert str(info.value) == message
    assert torch.equal(W, before)
    B, A = lx.svd_truncate(W, rank=1, method=method, balanced=True)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    torch.testing.assert_close(B.float() @ A.float(), W.float(), rtol=1e-2, atol=0)



# --- torch.func: the op has no autograd formula functorch can see -------------

def _factor_loss(balanced, svd=lx.svd_truncate):
    """A loss of each factor, not only of B·A (so balanced matters), and of the
    singular vectors' signs, so the transform must reproduce the op's."""
    def loss(W, C_B, C_A):
        B, A = svd(W, rank=2, balanced=balanced)
        return (B * C_B).sum() + (A * C_A).sum() + (B @ A).square().sum()
    return loss


def _reference_svd(W, rank, balanced):
    """The factors formed from torch.linalg.svd directly."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[:rank].sqrt()
    if balanced:
        return U[:, :rank] * root, Vh[:rank] * root.unsqueeze(1)
    return U[:, :rank] * S[:rank], Vh[:rank]


@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")
@pytest.mark.parametrize("balanced", [False, True])
def test_func_grad_equals_eager_backward(balanced):
    W = torch.randn(7, 5, dtype=torch.float64)
    C_B, C_A = torch.randn(7, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    got = torch.func.grad(_factor_loss(balanced))(W, C_B, C_A)
    W_eager = W.clone().requires_grad_()
    _factor_loss(balanced)(W_eager, C_B, C_A).backward()
    torch.testing.assert_close(got, W_eager.grad)
    W_ref = W.clone().requires_grad_()
    _factor_loss(balanced, _reference_svd)(W_ref, C_B, C_A).backward()
    torch.testing.assert_close(got, W_ref.grad)
    # Under a transform the factors are the op's, signs included.
    B, A = torch.func.vmap(lambda w: lx.svd_truncate(w, rank=2, balanced=balanced))(W[None])
    B_op, A_op = lx.svd_truncate(W, rank=2, balanced=balanced)
    assert torch.equal(B[0], B_op) and torch.equal(A[0], A_op)


def test_func_per_sample_gradients_and_half_precision():
    Ws = torch.randn(3, 6, 4, dtype=torch.float64)
    C_B, C_A = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(_factor_loss(True)), in_dims=(0, None, None))(
        Ws, C_B, C_A)
    for i in range(3):
        W = Ws[i].clone().requires_grad_()
        _factor_loss(True, _reference_svd)(W, C_B, C_A).backward()
        torch.testing.assert_close(per_sample[i], W.grad)
    # A half W is factorized in float32 and rounded once, as by the op.
    W = Ws[0].to(torch.bfloat16)
    g = torch.func.grad(lambda w: lx.svd_truncate(w, rank=2)[0].float().sum())(W)
    assert g.dtype == torch.bfloat16
    B, A = torch.func.vmap(lambda w: lx.svd_truncate(w, rank=2))(W[None])
    B_op, A_op = lx.svd_truncate(W, rank=2)
    assert torch.equal(B[0], B_op) and torch.equal(A[0], A_op)


def test_func_bad_input_raises_as_outside():
    W = torch.randn(4, 4)
    bad = W.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="svd_truncate: W contains NaN or Inf"):
        torch.func.grad(lambda w: lx.svd_truncate(w, rank=2)[0].sum())(bad)
    with pytest.raises(ValueError, match="svd_truncate: W contains NaN or Inf"):
        torch.func.vmap(lambda w: lx.svd_truncate(w, rank=2)[0])(torch.stack([W, bad]))
    with pytest.raises(ValueError, match="svd_truncate: rank must be in \\[1, 4\\]"):
        torch.func.grad(lambda w: lx.svd_truncate(w, rank=5)[0].sum())(W)
    big = torch.full((16, 16), 60000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="svd_truncate: factor B has entries up to 240000"):
        torch.func.vmap(lambda w: lx.svd_truncate(w, rank=1)[0])(big[None])


@pytest.mark.parametrize("criterion", [dict(energy=0.9), dict(tol=0.1)])
def test_func_a_rank_chosen_from_values_is_refused_under_vmap_only(criterion):
    # Each matrix of a vmap batch would get its own rank, so the factors
    # would differ in shape; grad alone is fine.
    W = torch.randn(3, 6, 5, dtype=torch.float64)
    name = next(iter(criterion))
    with pytest.raises(ValueError, match=f"svd_truncate: {name} chooses each matrix's rank"):
        torch.func.vmap(lambda w: lx.svd_truncate(w, **criterion)[0])(W)
    with pytest.raises(ValueError, match=f"svd_truncate: {name} chooses each matrix's rank"):
        torch.func.vmap(torch.func.grad(lambda w: lx.svd_truncate(w, **criterion)[0].sum()))(W)
    got = torch.func.grad(lambda w: lx.svd_truncate(w, **criterion)[0].sum())(W[0])
    W0 = W[0].clone().requires_grad_()
    lx.svd_truncate(W0, **criterion)[0].sum().backward()
    torch.testing.assert_close(got, W0.grad)


# --- σ₁ past the dtype's range: the SVD runs on W scaled by a power of two -----

def _past_range(dtype):
    """A finite rank-2 W whose σ₁ exceeds dtype's largest, and W / c for the c
    that scales it (float64, in range: the independent reference)."""
    g = torch.Generator().manual_seed(0)
    W0 = (torch.randn(8, 2, generator=g, dtype=torch.float64)
          @ torch.randn(2, 6, generator=g, dtype=torch.float64))
    c = torch.finfo(dtype).max / float(W0.abs().max()) / 1.01
    W = (W0 * c).to(dtype)
    return W, W.double() / c, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_balanced_factors_of_a_finite_W_whose_sigma_exceeds_its_dtype(dtype):
    # The balanced factors hold √σ each, well inside the range: the SVD of W
    # itself gave σ₁ = inf and inf factors, and choose_rank refused S.
    from lowrank_ext import _fallback
    from lowrank_ext._library import ops

    W, W_over_c, c = _past_range(dtype)
    before = W.clone()
    U, S, Vh = torch.linalg.svd(W_over_c)
    assert float(S[0]) * c > torch.finfo(dtype).max
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    for B, A in (lx.svd_truncate(W, rank=2, balanced=True), ops.svd_truncate(W, 2, True),
                 _fallback.svd_truncate(W, 2, True),
                 lx.svd_truncate(W, energy=0.999, balanced=True),
                 lx.svd_truncate(W, rank=2, balanced=True, method="randomized")):
        assert B.dtype == A.dtype == dtype and torch.isfinite(B).all() and torch.isfinite(A).all()
        # In units of √c, so that the reference's norms stay in float64's range.
        B_c, A_c = B.double() / math.sqrt(c), A.double() / math.sqrt(c)
        torch.testing.assert_close(B_c.norm(dim=0), S[:2].sqrt(), **tol)
        torch.testing.assert_close(A_c.norm(dim=1), S[:2].sqrt(), **tol)
        torch.testing.assert_close(B_c @ A_c, W_over_c, rtol=0,
                                   atol=(1e-5 if dtype == torch.float32 else 1e-10) * float(S[0]))
    assert torch.equal(W, before)


def test_unbalanced_factors_take_sigma_whole_or_name_the_range():
    from lowrank_ext import _fallback
    from lowrank_ext._library import ops

    # σ₁ = 4e38 is past float32's range; B = U·diag(S) is 2e38, inside it.
    W = torch.full((4, 4), 1e38)
    for B, A in (lx.svd_truncate(W, rank=1), _fallback.svd_truncate(W, 1, False)):
        torch.testing.assert_close(B.double().abs(), torch.full((4, 1), 2e38).double(),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(B.double() @ A.double(), W.double(), rtol=1e-5, atol=0)
    # Here B's entries, 1.2e39 (2e308, past even float64's range), are not:
    # a named error, worded alike by both backends; float64 has no wider
    # dtype to suggest.
    for W, pattern in ((torch.full((16, 16), 3e38),
                        r"svd_truncate: factor B has entries up to 1\.2\d*e\+39, beyond float32's "
                        r"range \(largest 3\.40282e\+38\); pass balanced=True or give a float64 W$"),
                       (torch.full((4, 4), 1e308, dtype=torch.float64),
                        r"svd_truncate: factor B has entries beyond float64's "
                        r"range \(largest 1\.79769e\+308\); pass balanced=True$")):
        messages = set()
        for call in (lambda: lx.svd_truncate(W, rank=1), lambda: ops.svd_truncate(W, 1, False),
                     lambda: _fallback.svd_truncate(W, 1, False)):
            with pytest.raises(ValueError, match=pattern) as info:
                call()
            messages.add(str(info.value))
        assert len(messages) == 1, messages
        B, A = lx.svd_truncate(W, rank=1, balanced=True)
        assert torch.isfinite(B).all() and torch.isfinite(A).all()


def test_func_scales_each_matrix_of_a_batch_by_its_own_power_of_two():
    # One root for the batch would flush the small matrix's entries to zero.
    Ws = torch.stack([torch.full((4, 3), 1e38), 1e-30 * torch.randn(4, 3)])
    B, A = torch.func.vmap(lambda w: lx.svd_truncate(w, rank=3, balanced=True))(Ws)
    for i in range(2):
        B_op, A_op = lx.svd_truncate(Ws[i], rank=3, balanced=True)
        assert torch.isfinite(B_op).all()
        assert torch.equal(B[i], B_op) and torch.equal(A[i], A_op)
    torch.testing.assert_close(B[1].double() @ A[1].double(), Ws[1].double(), rtol=0,
                               atol=1e-5 * float(Ws[1].abs().max()))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("to_layout", ["to_sparse", "to_sparse_csr"])
@pytest.mark.parametrize("kwargs", [{"rank": 2}, {"energy": 0.9},
                                    {"rank": 2, "method": "randomized"}])
def test_a_sparse_w_is_named(to_layout, kwargs):
    W = getattr(torch.randn(6, 4), to_layout)()
    with pytest.raises(TypeError, match=r"svd_truncate: W must be a dense \(strided\) tensor, "
                                        r"got layout sparse_c"):
        lx.svd_truncate(W, **kwargs)


def test_energy_one_gives_the_numerical_rank_of_a_wide_float32_matrix():
    """The SVD of a float32 rank-1 64 × 1024 matrix leaves values of about
    1e-6·‖W‖_F, 5e-12 of Σσ² together: past the energy slack, they were kept."""
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        W = (torch.randn(64, 1, generator=g) @ torch.randn(1, 1024, generator=g)).float()
        assert lx.svd_truncate(W, energy=1.0)[0].shape[1] == 1
        assert lx.svd_truncate(W, tol=0.0)[0].shape[1] == 1


def test_a_compiled_factorization_passes_the_gradient_to_w():
    """Traced, the op gave factors that claimed a gradient and passed none back."""
    torch.manual_seed(0)
    W0 = torch.randn(8, 6, dtype=torch.float64)

    def loss(w):
        B, A = lx.svd_truncate(w, 3)
        return (B @ A).pow(2).sum()

    eager = W0.clone().requires_grad_()
    loss(eager).backward()
    compiled = W0.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.compile(loss, backend="aot_eager")(compiled).backward()
    assert compiled.grad is not None
    torch.testing.assert_close(compiled.grad, eager.grad)


def test_to_linear_refuses_a_product_past_the_half_range():
    """Finite float16 factors whose product passes 65504 (a float16 weight at
    its limit factored and multiplied back can round there) gave an inf weight."""
    A = torch.full((1, 3), 256.0, dtype=torch.float16)
    B = torch.full((2, 1), 256.0, dtype=torch.float16)  # B·A = 65536
    layer = lx.LowRankLinear.from_factors(A, B, None)
    with pytest.raises(ValueError, match=r"to_linear: B·A exceeds the range of float16; "
                                         r"convert the layer first"):
        layer.to_linear()
    assert bool((layer.float().to_linear().weight == 65536).all())


@pytest.mark.parametrize("balanced", [False, True])
def test_the_op_itself_has_an_autograd_kernel(balanced):
    # torch ran it through its deprecated autograd fallthrough (a warning,
    # "may lead to silently incorrect behavior"), and opcheck refused it.
    torch.manual_seed(0)
    W = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        B, A = torch.ops.lowrank_ext.svd_truncate(W, 3, balanced)
        (B.sum() + A.square().sum()).backward()
    expected_B, expected_A = lx.svd_truncate(W.detach(), 3, balanced=balanced)
    torch.testing.assert_close(B.detach(), expected_B)
    torch.testing.assert_close(A.detach(), expected_A)
    grad = W.grad.clone()
    W.grad = None
    B2, A2 = lx.svd_truncate(W, 3, balanced=balanced)
    (B2.sum() + A2.square().sum()).backward()
    torch.testing.assert_close(grad, W.grad)
    torch.autograd.gradcheck(
        lambda w: torch.ops.lowrank_ext.svd_truncate(w, 3, balanced), (W.detach().requires_grad_(),))
    with torch.no_grad():
        assert not torch.ops.lowrank_ext.svd_truncate(W, 3, balanced)[0].requires_grad
    meta = torch.empty(6, 5, device="meta", requires_grad=True)
    assert torch.ops.lowrank_ext.svd_truncate(meta, 2, balanced)[0].shape == (6, 2)
    from torch.library import opcheck
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    opcheck(torch.ops.lowrank_ext.svd_truncate.default, (W, 3, balanced), test_utils=checks)
    # Traced, its kernels cannot be differentiated (they read W's values):
    # factors without a gradient, as before, but now said so.
    # lx.svd_truncate runs such a call outside the graph.
    traced = torch.compile(lambda w: torch.ops.lowrank_ext.svd_truncate(w, 3, balanced)[0],
                           backend="aot_eager", fullgraph=True)
    with pytest.warns(UserWarning, match="traced with a W that requires grad, gives factors "
                                         "without a gradient"):
        torch.testing.assert_close(traced(W), expected_B)
    compiled = torch.compile(lambda w: lx.svd_truncate(w, 3, balanced=balanced)[0],
                             backend="aot_eager")
    torch.testing.assert_close(compiled(W), expected_B)


def test_forward_mode_tangents_pass_through_svd_truncate():
    # Below autograd the tangent was dropped without a word.
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    W = torch.randn(6, 5, dtype=torch.float64)
    T = torch.randn(6, 5, dtype=torch.float64)
    for balanced in (False, True):
        expected = torch.func.jvp(
            lambda w: lx.svd_truncate(w, rank=2, balanced=balanced), (W,), (T,))[1]
        # An independent tangent: a central difference in float64.
        h = 1e-6
        plus = lx.svd_truncate(W + h * T, rank=2, balanced=balanced)
        minus = lx.svd_truncate(W - h * T, rank=2, balanced=balanced)
        for got, p, m in zip(expected, plus, minus):
            torch.testing.assert_close(got, (p - m) / (2 * h), atol=1e-6, rtol=1e-5)
        for call in (lambda d: lx.svd_truncate(d, rank=2, balanced=balanced),
                     lambda d: torch.ops.lowrank_ext.svd_truncate(d, 2, balanced)):
            with fwAD.dual_level():
                factors = call(fwAD.make_dual(W, T))
                tangents = [fwAD.unpack_dual(f).tangent for f in factors]
            for got, want in zip(tangents, expected):
                assert got is not None
                torch.testing.assert_close(got, want)
