"""``python -m lowrank_ext demo``: the seed notebook, step by step, on this package's ops.

A 10×10 matrix W of rank 2 is factored by truncated SVD into B (10×2) and
A (2×10); y = W·x + b is compared with y' = lowrank_linear(x, A, B, b), which
never forms W, and the parameter counts are compared (100 against 40). The
op itself is checked against (x·Aᵀ)·Bᵀ + b in float64 from the same factors:
y and y' also differ by W − B·A, which is not small for an ill-conditioned
W of full rank (``--size 1000 --rank 1000``).
"""

HELP = "walk through the seed example: factor a rank-2 matrix and apply it with the fused op"


def add_arguments(parser):
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=10, help="W is size × size (default 10)")
    parser.add_argument("--rank", type=int, default=2, help="rank of W (default 2)")


# The largest --size: the demo's full SVD of a 4096 × 4096 matrix takes about
# half a minute and 400 MB on 2 cores; beyond, minutes and gigabytes.
_MAX_SIZE = 4096


def run(args):
    import torch

    from . import backend_info, choose_rank, lowrank_linear, svd_truncate

    if not -2**63 <= args.seed < 2**64:  # torch.manual_seed's range
        raise ValueError(f"--seed must be in [-2**63, 2**64 - 1], got {args.seed}")
    if not 1 <= args.size <= _MAX_SIZE:
        # Checked before any output: a full SVD of size × size runs below.
        raise ValueError(f"--size must be in [1, {_MAX_SIZE}], got {args.size} (the demo "
                         "runs a full SVD of a size × size matrix)")
    if not 1 <= args.rank <= args.size:
        raise ValueError(f"--rank must be in [1, --size] = [1, {args.size}], got {args.rank}")
    torch.manual_seed(args.seed)
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=100)
    d = k = args.size
    info = backend_info()
    backend = "compiled C++ kernels" if info["cpu"] else "pure-torch fallback"
    print(f"lowrank_ext {info['version']} on torch {info['torch']}: {backend}")
    if info["fallback_reason"]:
        print(f"  (fallback because {info['fallback_reason']})")

    print(f"\n1. W = (d×{args.rank})·({args.rank}×k), a {d}×{k} matrix of rank {args.rank}")
    W = torch.randn(d, args.rank) @ torch.randn(args.rank, k)
    rank = int(torch.linalg.matrix_rank(W))
    print(f"   shape of W: {tuple(W.shape)}, rank of W: {rank}")

    print("\n2. SVD: W = U·diag(S)·Vᵀ")
    U, S, Vh = torch.linalg.svd(W)
    print(f"   U {tuple(U.shape)}, S {tuple(S.shape)}, Vᵀ {tuple(Vh.shape)}")
    print(f"   singular values: {S}")
    energy_rank = choose_rank(S, energy=1.0)
    print(f"   rank holding all of the energy Σσ² (choose_rank): {energy_rank}")

    print(f"\n3. keep the first r = {rank} triplets: B = U_r·diag(S_r), A = V_rᵀ  (svd_truncate)")
    B, A = svd_truncate(W, rank=rank)
    print(f"   B {tuple(B.shape)}, A {tuple(A.shape)}")
    err = float(torch.linalg.matrix_norm(W - B @ A) / torch.linalg.matrix_norm(W))
    print(f"   ‖W − B·A‖_F / ‖W‖_F = {err:.2e}")

    print("\n4. y = W·x + b  against  y' = lowrank_linear(x, A, B, b) = (x·Aᵀ)·Bᵀ + b")
    bias = torch.randn(d)
    x = torch.randn(k)
    y = W @ x + bias
    y_prime = lowrank_linear(x, A, B, bias)
    print(f"   y  = {y}")
    print(f"   y' = {y_prime}")
    # y and y' differ by float32 rounding and by W − B·A (step 3), which for
    # an ill-conditioned full-rank W is far from 0: the op's own check
    # compares y' with its float64 reference from the same A and B, within
    # the worst-case float32 rounding of its sums of k, then r products.
    x64, A64, B64, bias64 = (t.double() for t in (x, A, B, bias))
    reference = (x64 @ A64.T) @ B64.T + bias64
    bound = (k + rank + 1) * 2.0**-24 * ((x64.abs() @ A64.abs().T) @ B64.abs().T
                                          + bias64.abs())
    op_diff = (y_prime.double() - reference).abs()
    equal = bool((op_diff <= bound).all())
    print(f"   max |y − y'| = {float((y - y_prime).abs().max()):.2e}  "
          "(float32 rounding, and W − B·A of step 3)")
    print(f"   y' against (x·Aᵀ)·Bᵀ + b in float64 from the same A, B: max difference "
          f"{float(op_diff.max()):.2e}  ->  "
          f"{'equal up to float32 rounding' if equal else 'DIFFERENT'}")

    print("\n5. parameters")
    print(f"   W: {W.numel()}   B and A: {B.numel() + A.numel()}")

    print("\nNext: LoRA (arXiv 2106.09685) trains such low-rank factors beside a frozen layer;")
    print("see lowrank_ext.lora_linear.")
    if not equal:
        worst = int(torch.argmax(op_diff - bound))
        raise RuntimeError(
            f"lowrank_linear differs from (x·Aᵀ)·Bᵀ + b in float64 by "
            f"{float(op_diff[worst]):.2e} at output {worst}, more than float32 rounding "
            f"({float(bound[worst]):.1e} there)")
    return 0
