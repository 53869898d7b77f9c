"""``python -m lowrank_ext spectrum``: the singular values of a weight in a safetensors file.

Prints the ranks that keep common energy fractions; with ``--plot`` draws the
singular values and the cumulative energy curve (needs matplotlib:
``pip install lowrank_ext[plot]``). Without ``--layer`` it lists the 2-D
weights and their ranks at 90/99 % energy.
"""

from ._plotting import load_matplotlib, plot_format

HELP = "show or plot the singular values and energy curve of weights in a safetensors file"

_ENERGIES = (0.5, 0.9, 0.95, 0.99, 0.999)


def add_arguments(parser):
    parser.add_argument("input", metavar="IN.safetensors",
                        help="the file to read, or a sharded checkpoint: its *.index.json, "
                             "or a directory as save_pretrained writes it")
    parser.add_argument("--layer", metavar="NAME",
                        help="tensor name, or module name whose '.weight' to use")
    parser.add_argument("--plot", metavar="OUT.png", help="write a plot (needs --layer)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing plot")


def _plot(path, name, S, energy):
    from .files import atomic_write

    plt = load_matplotlib()
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    ranks = range(1, len(S) + 1)
    ax_s.semilogy(ranks, S.clamp_min(1e-300).tolist())
    ax_s.set(title=f"singular values of {name}", xlabel="index i", ylabel="σ_i")
    ax_e.plot(ranks, energy.tolist())
    for target in (0.9, 0.99):
        ax_e.axhline(target, color="gray", linestyle=":", linewidth=0.8)
    ax_e.set(title="energy kept by the leading r values", xlabel="rank r",
             ylabel="fraction of Σσ² kept", ylim=(0, 1.02))
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=plot_format(path)))
    finally:
        plt.close(fig)


def _is_matrix(tensor_slice):
    """A non-empty 2-D floating-point tensor, from its safetensors header
    (dtypes F64, F32, F16, BF16, F8_*, ...)."""
    shape, dtype = tensor_slice.get_shape(), tensor_slice.get_dtype()
    return len(shape) == 2 and 0 not in shape and (dtype.startswith("F") or dtype == "BF16")


def run(args):
    import torch
    from ._checks import dtype_name
    from ._names import preview
    from .compress_cli import check_output_is_not_input
    from .files import check_output_path
    from .serialization import model_files, opened, read_tensor
    from .svd import choose_rank, scaled_singular_values

    files = model_files(args.input, owner=None)
    # (Given as "" they are given: an empty --plot is refused, --layer "" is
    # the tensor of that name.)
    if args.plot is not None and args.layer is None:
        raise ValueError("--plot needs --layer NAME")
    if args.plot is not None:
        # Fail before the SVD: a plot that cannot be written (over the
        # input itself, even with --force), matplotlib missing.
        check_output_path(None, args.plot, force=args.force, what="--plot")
        check_output_is_not_input(args.plot, args.input, files, option="--plot")
        load_matplotlib()
        plot_format(args.plot)
    if args.layer is None:
        # A bad file, or one without a matrix (as compress refuses it): one
        # error line, before the table. Read from the headers alone.
        if not any(_is_matrix(f.get_slice(key)) for _, f in opened(files, None)
                   for key in f.keys()):
            raise ValueError(f"{args.input} has no 2-D floating-point tensor")
        print(f"{'tensor':<50} {'shape':>12} {'r@90%':>6} {'r@99%':>6}")
        for path, f in opened(files, None):  # each shard of a checkpoint in turn
            for key in f.keys():
                header = f.get_slice(key)
                if _is_matrix(header):  # from the header: others are not read
                    shape = 'x'.join(map(str, header.get_shape()))
                    try:
                        t = read_tensor(f, path, key, None)
                    except ValueError:  # a dtype torch has no type for (F6_E2M3, say)
                        print(f"{key:<50} {shape:>12} cannot read {header.get_dtype()}")
                        continue
                    try:
                        t = t.double()  # float8 has no isfinite of its own
                    except (RuntimeError, NotImplementedError):  # packed float4, say
                        print(f"{key:<50} {shape:>12} cannot read {dtype_name(t.dtype)}")
                        continue
                    if bool(torch.isfinite(t).all()):
                        S, _ = scaled_singular_values(t)
                        ranks = f"{choose_rank(S, energy=0.9):>6} {choose_rank(S, energy=0.99):>6}"
                    else:
                        ranks = f"{'has NaN or Inf':>13}"
                    print(f"{key:<50} {shape:>12} {ranks}")
        return 0
    where, matrices = {}, []  # {key: its file}; the 2-D tensors, whose names may be meant
    for path, f in opened(files, None):
        for key in f.keys():
            where[key] = path
            if len(f.get_slice(key).get_shape()) == 2:
                matrices.append(key)
    key = args.layer if args.layer in where else f"{args.layer}.weight"
    if key not in where:
        raise KeyError(f"no tensor {args.layer!r} (nor {args.layer + '.weight'!r}) in "
                       f"{args.input} (2-D tensors: {preview(matrices)})")
    for path, f in opened([where[key]], None):
        W = read_tensor(f, path, key, None)
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{key} must be a 2-D floating-point tensor, got shape {list(W.shape)} "
                         f"and dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"tensor {key!r} in {args.input} is empty (shape {list(W.shape)})")
    try:
        W = W.double()  # float8 has no isfinite of its own
    except (RuntimeError, NotImplementedError) as exc:  # packed float4, say
        raise ValueError(f"tensor {key!r} in {args.input} is {dtype_name(W.dtype)}, which "
                         "cannot be read as numbers here") from exc
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"tensor {key!r} in {args.input} has NaN or Inf")
    # Of W scaled by a power of two: σ_1 of a finite W can be past float64's
    # range (the ranks are the same).
    scaled, root = scaled_singular_values(W)
    S = scaled * root * root  # as printed and plotted: inf only past the range
    # Scaled by σ_1 first, as choose_rank does: the squares of σ ≈ 1e200
    # overflow, and the curve would be all NaN.
    s2 = (scaled / scaled[0]) ** 2 if float(scaled[0]) > 0 else scaled
    energy = torch.cumsum(s2, 0) / s2.sum().clamp_min(1e-300)
    d, k = W.shape
    print(f"{key}: shape {d}x{k}, break-even rank d·k/(d+k) = {d * k / (d + k):.1f}")
    print(f"σ_1 = {float(S[0]):.4g}, σ_min = {float(S[-1]):.4g}")
    for target in _ENERGIES:
        print(f"  rank for {target:.1%} energy: {choose_rank(scaled, energy=target)}")
    if args.plot is not None:
        _plot(args.plot, key, S, energy)
        print(f"wrote {args.plot}")
    return 0
