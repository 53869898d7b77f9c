"""``python -m lowrank_ext compress``: factorize the 2-D weights of a safetensors file.

Plain truncated SVD, no model code needed. A weight ``<name>.weight`` (d, k)
of rank r is stored as ``<name>.A`` (r, k) and ``<name>.B`` (d, r), the
parameter names of ``LowRankLinear``, and the ranks go into the metadata, so
``lowrank_ext.load_compressed`` loads the output into the original model (it
turns the factors of a transformers ``Conv1D``, whose weight is stored
transposed, around).
Other tensors, and weights where factorizing saves nothing, are copied as they are.
So are factors the input already holds (the output of ``save_compressed`` or
of an earlier run; without lowrank_ext metadata, its ``<layer>.A`` /
``<layer>.B`` pairs, as ``load_compressed`` reads them); their ranks stay in
the metadata beside the new ones. A file whose factors are in ``nn.Linear``
layout (from ``save_compressed``, or a compressed model's state_dict) takes
no new ones: one file holds its factors in one layout.

Without model code a 2-D tensor does not say whether it is a Linear layer's
weight. ``load_compressed`` swaps only Linear layers, so a file with a
factorized embedding table, or a factorized tensor that is no layer's
``.weight`` (a bare projection parameter), would not load: such tensors are
kept unless ``--all-tensors``. So is the ``out_proj`` weight of a torch
``nn.MultiheadAttention``, which that module reads directly instead of
calling the layer (``lx.split_attention`` and ``compress_model`` reach it).
"""

import os

HELP = "factorize the 2-D weights of a safetensors file by truncated SVD"


def add_arguments(parser):
    parser.add_argument("input", metavar="IN.safetensors",
                        help="the file to compress, or a sharded checkpoint: its "
                             "*.index.json, or a directory as save_pretrained writes it")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                        help="where to write the factorized weights")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float,
                        help="fraction of each weight's parameters kept, in (0, 1]")
    target.add_argument("--rank", type=int, help="the same rank for every weight")
    target.add_argument("--energy", type=float,
                        help="per weight, the smallest rank keeping this fraction of Σσ²")
    parser.add_argument("--rank-multiple", type=int, default=1, metavar="N",
                        help="make every rank a multiple of N (kernels run the rank in "
                             "blocks, e.g. 16): --ratio rounds down, --energy up, --rank "
                             "must be one")
    parser.add_argument("--include", action="append", metavar="PATTERN",
                        help="only module names matching this glob (full name or dotted "
                             "suffix; repeatable). Default: every 2-D floating weight "
                             "(but see --all-tensors)")
    parser.add_argument("--exclude", action="append", metavar="PATTERN",
                        help="skip module names matching this glob (repeatable)")
    parser.add_argument("--all-tensors", action="store_true",
                        help="also factorize 2-D tensors that load_compressed cannot put "
                             "into a Linear layer, kept by default: those named like "
                             "embedding tables (*embed*, wte, wpe, shared, "
                             "relative_attention_bias) and those not called <module>.weight")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def module_name(key):
    """The module name of a weight key: ``"enc.fc.weight"`` -> ``"enc.fc"``."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


# Last name components of embedding tables in common model code (transformers:
# word/position/token-type embeddings, embed_tokens, embed_positions, GPT-2's
# wte and wpe, T5's shared table and relative attention bias).
_EMBEDDING_NAMES = ("wte", "wpe", "shared", "relative_attention_bias")


def looks_like_embedding(name):
    """True for a module name whose last component names an embedding table."""
    last = name.rsplit(".", 1)[-1].lower()
    return "embed" in last or last in _EMBEDDING_NAMES


# Floating-point dtypes whose values are the weight itself; float8 weights
# come with scales stored elsewhere, which a factorization would ignore.
_FACTORIZABLE_DTYPES = ("float16", "bfloat16", "float32", "float64")


def packed_attention_out_projections(keys):
    """Module names of the ``out_proj`` of each ``nn.MultiheadAttention`` in ``keys``.

    Such a module stores its input projections as parameters of its own,
    ``in_proj_weight`` (or ``q_proj_weight`` when keys and values have other
    sizes), beside its ``out_proj`` layer.
    """
    found = set()
    for key in keys:
        for packed in ("in_proj_weight", "q_proj_weight"):
            if key == packed or key.endswith("." + packed):
                found.add(key[: -len(packed)] + "out_proj")
    return found


def check_output_is_not_input(output, input_path, files, option="--output"):
    """Refuse an output that is the input file, its index or one of its shards,
    even with --force: the weights being read would be replaced (and a
    shard rewritten in place leaves a checkpoint whose index no longer
    matches it)."""
    inputs = list(files)
    index = (os.path.join(input_path, "model.safetensors.index.json")
             if os.path.isdir(input_path) else input_path)
    inputs.append(index)
    if not os.path.exists(output):
        return
    for path in inputs:
        if os.path.exists(path) and os.path.samefile(output, path):
            raise ValueError(f"{option} {output} is {path}, part of the input {input_path}; "
                             "write the output under another name")


def run(args):
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ._checks import dtype_name
    from ._names import preview
    from .compress import rounding_note
    from .rank_choice import check_blocks_fit, round_rank
    from .selection import select_names
    from .nn import break_even_rank, rank_for_ratio
    from .report import CompressionReport, LayerReport
    from .files import atomic_write, check_output_path
    from .serialization import (METADATA_KEY, factor_pairs, model_files, opened,
                                ranks_in_metadata, ranks_metadata, read_tensor, stored_aliases)
    from .svd import choose_rank, scaled_singular_values, svd_truncate

    files = model_files(args.input, owner=None)
    check_output_path(None, args.output, force=args.force, what="--output")
    check_output_is_not_input(args.output, args.input, files)
    if args.ratio is not None:
        try:
            rank_for_ratio(2, 2, args.ratio)  # validates the ratio
        except ValueError as exc:
            raise ValueError(f"--{exc}") from None  # "ratio must be ..." as the option
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    if args.energy is not None and not 0.0 < args.energy <= 1.0:
        raise ValueError(f"--energy must be in (0, 1], got {args.energy}")
    multiple = args.rank_multiple
    if multiple < 1:
        raise ValueError(f"--rank-multiple must be >= 1, got {multiple}")
    if args.rank is not None and args.rank % multiple:
        raise ValueError(f"--rank {args.rank} is not a multiple of --rank-multiple {multiple}")

    tensors, metadata, metadatas = {}, {}, []
    for path, f in opened(files, None):  # one file, or the shards of a checkpoint, as one
        tensors.update({key: read_tensor(f, path, key, None) for key in f.keys()})
        metadatas.append(f.metadata() or {})
        metadata.update(metadatas[-1])
    # Layers the input holds factorized already: named in its metadata, or
    # without any, its <layer>.A / .B pairs, as load_compressed reads them (a
    # compressed model's state_dict, in nn.Linear layout).
    existing, layout = ranks_in_metadata(args.input, files, metadatas, owner=None)
    if layout is None:
        existing = factor_pairs({key: tuple(t.shape) for key, t in tensors.items()})
        layout = "linear" if existing else None
    factor_keys = {f"{name}.{part}" for name in existing for part in ("A", "B")}

    stored_as = stored_aliases(metadata, tensors)  # alias -> the key it is stored under
    aliases = {}  # stored key -> the other names of that tensor
    for alias, key in stored_as.items():
        aliases.setdefault(key, []).append(alias)
    # Module name -> its 2-D floating-point tensors: usually one; a bare
    # tensor `fc` beside `fc.weight` shares the name.
    candidates = {}
    for key, t in tensors.items():
        if t.dim() == 2 and t.is_floating_point() and t.numel() > 0 and key not in factor_keys:
            candidates.setdefault(module_name(key), []).append(key)
    if not candidates:
        raise ValueError(f"{args.input} has no 2-D floating-point tensor to factorize"
                         + (f" (its layers {preview(list(existing))} are factorized already)"
                            if existing else ""))
    names = select_names(list(candidates), args.include, args.exclude,
                         owner=None, what="2-D weight")

    records, planned = [], []  # planned: (name, key) of the weights to factorize
    for name, r in existing.items():
        # A layer registered under two names (one module shared) has its
        # factors stored once, the second name an alias in the metadata.
        keys = {part: stored_as.get(f"{name}.{part}", f"{name}.{part}") for part in "AB"}
        A, B = tensors.get(keys["A"]), tensors.get(keys["B"])
        # The metadata's ranks against the factors, as load_compressed checks
        # them: a report (and a file) with other ranks would be wrong.
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 \
                or not A.shape[0] == B.shape[1] == r:
            seen = ("no tensors " + f"{name}.A and {name}.B" if A is None and B is None else
                    f"no tensor {name}.{'A' if A is None else 'B'}" if A is None or B is None
                    else f"{name}.A of shape {list(A.shape)} and {name}.B of shape "
                         f"{list(B.shape)}")
            raise ValueError(f"{args.input} gives layer {name!r} rank {r} in its lowrank_ext "
                             f"metadata, but holds {seen}")
        d, k = B.shape[0], A.shape[1]
        owner = keys["A"].rpartition(".")[0]
        if owner != name and owner in existing:  # counted once, under the name it is stored as
            records.append(LayerReport(name, (d, k), r, 0, 0, None,
                                       note=f"factorized already in the input, the same "
                                            f"factors as {owner}; kept as it is"))
            continue
        records.append(LayerReport(name, (d, k), r, d * k, r * (d + k), None,
                                   note="factorized already in the input; kept as it is"))
    attention_out = packed_attention_out_projections(tensors)

    def kept_dense(name, shape, note):
        records.append(LayerReport(name, shape, None, shape[0] * shape[1],
                                   shape[0] * shape[1], 0.0, note=note))

    # First every decision and check that needs no SVD, so that a refusal
    # comes before any SVD work; then the ranks (--energy reads spectra); then
    # the checks on what will be written; the truncations last.
    for name in names:
        keys = candidates[name]
        if len(keys) > 1:
            if args.all_tensors:
                raise ValueError(
                    f"{preview(keys)} in {args.input} would all be the layer {name!r}, and "
                    f"their factors the same {name}.A and {name}.B; leave out --all-tensors "
                    "(the tensors not called <module>.weight then stay dense)")
            for key in keys:  # all but <name>.weight stay dense, as below
                if not key.endswith(".weight"):
                    kept_dense(key, tuple(tensors[key].shape),
                               "dense: not a layer's .weight, which load_compressed cannot "
                               "put into a Linear layer; --all-tensors factorizes it anyway")
            keys = [key for key in keys if key.endswith(".weight")]
        key = keys[0]
        W = tensors[key]
        d, k = W.shape
        if aliases.get(key):
            kept_dense(name, (d, k), f"dense: stored once for {', '.join(aliases[key])} "
                                     "too (tied); factorizing would take their weight away")
            continue
        if dtype_name(W.dtype) not in _FACTORIZABLE_DTYPES:
            kept_dense(name, (d, k), f"dense: {dtype_name(W.dtype)}, "
                                     "a quantized weight whose scales live elsewhere")
            continue
        why_kept = (None if args.all_tensors else
                    "not a layer's .weight" if not key.endswith(".weight") else
                    "named like an embedding table" if looks_like_embedding(name) else
                    "the out_proj of an nn.MultiheadAttention (the module reads this "
                    "weight itself)" if name in attention_out else None)
        if why_kept:
            kept_dense(name, (d, k), f"dense: {why_kept}, which load_compressed cannot put "
                                     "into a Linear layer; --all-tensors factorizes it anyway")
            continue
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"weight {key!r} in {args.input} has NaN or Inf")
        planned.append((name, key))

    if args.ratio is not None and planned:
        # The budget over the weights factorized, as compress_model checks it:
        # rank 1 (or one block) for every weight must fit in it.
        shapes = {name: tuple(tensors[key].shape) for name, key in planned}
        try:
            check_blocks_fit(shapes, args.ratio, multiple, "uniform", owner=None)
        except ValueError as exc:  # worded for compress_model's arguments
            message = str(exc).replace("rank_multiple", "--rank-multiple")
            raise ValueError(f"--{message}" if message.startswith("ratio ") else message) \
                from None

    def factor_prefix(name, key):
        prefix = name if key.endswith(".weight") else key
        for suffix in ("A", "B"):
            if f"{prefix}.{suffix}" in tensors:
                raise ValueError(f"cannot store {key!r} as {prefix}.{suffix}: the file already "
                                 "has a tensor of that name")
        return prefix

    # B·A is each tensor as this file stores it (transposed for a Conv1D);
    # load_compressed turns the factors of such layers around. A file holds
    # its factors in one layout, and which of the earlier layers are Conv1D
    # (where the layouts differ) cannot be told from the file.
    def check_one_layout(factorizing):
        if factorizing and existing and layout != "stored":
            source = ("by save_compressed" if any(METADATA_KEY in m for m in metadatas) else
                      "without lowrank_ext metadata, as in a compressed model's state_dict")
            raise ValueError(
                f"{args.input} holds layers factorized {source} ({preview(list(existing))}), "
                "whose factors are in nn.Linear layout, and one file cannot mix that with the "
                "factors of stored tensors this command writes; compress the original file, "
                "or load the model and use lowrank_ext.compress_model")

    if args.energy is not None:
        # The ranks come from spectra: what would be written is checked for
        # every weight planned before any SVD (one that then stays dense too).
        check_one_layout(bool(planned))
        for name, key in planned:
            factor_prefix(name, key)

    ranked = []  # (name, key, rank, prefix of the factors' names)
    for name, key in planned:
        W = tensors[key]
        d, k = W.shape
        if args.ratio is not None:
            r = round_rank(rank_for_ratio(d, k, args.ratio), multiple, d, k)
        elif args.rank is not None:
            r = args.rank
        else:
            r = round_rank(choose_rank(scaled_singular_values(W)[0], energy=args.energy),
                           multiple, d, k, up=True)
        if r >= break_even_rank(d, k):
            kept_dense(name, (d, k), f"dense: rank {r} >= d·k/(d+k) = "
                                     f"{break_even_rank(d, k):.1f} saves nothing")
            continue
        ranked.append((name, key, r, factor_prefix(name, key)))
    check_one_layout(bool(ranked))

    out, ranks = dict(tensors), {}
    for name, key, r, prefix in tqdm(ranked, desc="compress", unit="weight", disable=None,
                                     leave=False):
        W = tensors[key]
        d, k = W.shape
        try:
            unrounded = svd_truncate(W.double(), r)
        except ValueError as exc:  # σ₁ itself past float64's range: B = U·diag(S) cannot hold it
            raise ValueError(
                f"the rank-{r} factors of weight {key!r} in {args.input} exceed the range of "
                "float64; --exclude the layer") from exc
        # The error reported is that of the factors as written, in the
        # weight's dtype: in bfloat16 their rounding can outweigh the truncation.
        B, A = (factor.to(W.dtype) for factor in unrounded)
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            # B = U·diag(S) holds σ₁, which can be past the range of a half
            # dtype where every entry of W is within it (float32 and
            # bfloat16 share a range: float64 is the wider one for both).
            largest = max(float(f.abs().max()) for f in unrounded)
            wider = "float32" if W.dtype == torch.float16 else "float64"
            raise ValueError(
                f"the rank-{r} factors of weight {key!r} in {args.input} exceed the range of "
                f"{dtype_name(W.dtype)} (entries up to {largest:g}); compress a {wider} copy "
                "of the file, or --exclude the layer")
        # Scaled by max|W| first, as spectrum scales σ by σ_1: the squares
        # summed in the norms overflow for a float64 W near 1e200 (NaN) and
        # underflow near 1e-300 (0).
        scale = float(W.double().abs().max()) or 1.0

        def relative_error(B, A):
            Ws = W.double() / scale
            return float(torch.linalg.matrix_norm(Ws - (B.double() / scale) @ A.double()) /
                         torch.linalg.matrix_norm(Ws).clamp_min(1e-300))

        error = relative_error(B, A)
        note = ("" if args.energy is None else
                rounding_note(W.dtype, relative_error(*unrounded), error, args.energy, None))
        for suffix, factor in (("A", A), ("B", B)):
            out[f"{prefix}.{suffix}"] = factor.contiguous()
        del out[key]
        ranks[name] = r
        records.append(LayerReport(name, (d, k), r, d * k, r * (d + k), error, note=note))

    # The report in the order of the file's layers (those factorized already
    # first), whichever pass decided each.
    order = {name: i for i, name in enumerate(names)}
    records.sort(key=lambda record: order.get(record.name, -1))
    # A file without metadata stays so: its pairs are read as they were (the
    # metadata would name them as layers, whatever module holds them).
    if ranks or not existing:
        metadata.update(ranks_metadata({**existing, **ranks}, factors="stored"))
    elif any(METADATA_KEY in m for m in metadatas):
        # Every shard's layers: each shard's entry names its own only, and
        # the merged metadata kept the last one's.
        metadata.update(ranks_metadata(existing, factors=layout))
    atomic_write(args.output, lambda tmp: save_file(out, tmp, metadata=metadata))
    report = CompressionReport(records)
    print(report.to_json(indent=2) if args.json else report)
    if not args.json:
        print(f"wrote {args.output}")
    return 0
