"""``python -m lowrank_ext bench``: time lowrank_linear against its baselines."""

import errno
import json
import os
import sys

# Every side; dense left out by itself in modes without one (see run).
DEFAULT_SIDES = "ours,compose,compiled,dense"

HELP = ("time lowrank_linear (or lora_linear) against the F.linear composition, "
        "torch.compile and dense")


def add_arguments(parser):
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--op", choices=("lowrank", "lora", "dora"), default="lowrank",
                        help="lowrank: lowrank_linear; lora: lora_linear (a frozen d × k "
                             "layer plus a rank-r adapter) against peft's unmerged forward; "
                             "dora: a DoRA LoRALinear against peft's DoRA forward")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes (default: float32,bfloat16 on cpu; "
                             "bfloat16 plus one float32 shape on cuda)")
    parser.add_argument("--shapes", default=None,
                        help='"M,k,r,d;M,k,r,d" (default: the standard shapes for the '
                             'device and op)')
    parser.add_argument("--modes", default="fwd,train",
                        help="comma-separated: fwd (inference), train (forward + backward)")
    parser.add_argument("--sides", default=None,
                        help="comma-separated sides to time (ours is always kept; default: "
                             f"{DEFAULT_SIDES}, dense only in the modes that have one)")
    parser.add_argument("--rounds", type=int, default=15,
                        help="interleaved timed rounds per side (the median is reported)")
    parser.add_argument("--batch-ms", type=float, default=20.0,
                        help="target length of one timed sample, in milliseconds")
    parser.add_argument("--warmup-s", type=float, default=0.2, help="warmup per side")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch thread count for every side (default: torch's)")
    parser.add_argument("--no-rotate", action="store_true",
                        help="reuse one input set (hot caches) instead of rotating copies")
    parser.add_argument("--json", metavar="PATH",
                        help="write every figure as JSON (- for standard output; the table "
                             "then goes to standard error)")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write the table as markdown (- for standard output)")
    parser.add_argument("--plot", metavar="PATH", help="draw the ratios (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _split(text, allowed, option):
    """The items of a comma-separated option, each once, in the order given."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{option}: bad value {','.join(bad) or text!r}; choose from "
                         f"{', '.join(allowed)}")
    return list(dict.fromkeys(items))  # a repeated side or mode would be timed twice


def _named(option, parse, text):
    """``parse(text)`` with its ValueError naming ``option``."""
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


# The largest tensor torch can allocate: its size in bytes is an int64.
_MAX_BYTES = 2**63 - 1


def _check_shape_sizes(shapes):
    """A ValueError naming --shapes for a shape whose tensors no machine could
    hold, before the timing: torch would fail on it only when the inputs are
    made, in words that name no option ("Overflow when unpacking long long")."""
    for M, k, r, d in shapes:
        # x, A, B, the output (and gy), x·Aᵀ and the d × k weight of the dense
        # side and the adapter ops, each also made in float64 (8 bytes).
        for rows, cols in ((M, k), (r, k), (d, r), (M, d), (M, r), (d, k)):
            if rows * cols * 8 > _MAX_BYTES:
                raise ValueError(
                    f"--shapes {M},{k},{r},{d}: a {rows} × {cols} tensor of float64 would take "
                    f"more than 2**63 - 1 bytes, more than torch can allocate")


def _make_directory_of(path):
    """Make the missing directories above ``path``; those made, deepest first."""
    made = []
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(directory):
        made.append(directory)
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        # os.makedirs would say "File exists", which names neither.
        raise NotADirectoryError(f"cannot write {path}: {directory} is not a directory")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:
        _remove_directories(made)
        raise type(exc)(f"cannot write {path}: {exc.strerror or exc}") from None
    return made


def _remove_directories(made):
    """Remove the directories ``made`` (deepest first) that are still empty."""
    for directory in made:
        try:
            os.rmdir(directory)
        except OSError:  # gone, or holds a file by now
            pass


def _check_outputs(args):
    """Fail before the timing, which may take minutes, on outputs that cannot
    be written: a missing directory, one where no file can be created, no
    matplotlib, an image format it lacks. Returns the directories it made,
    deepest first; a failure leaves none behind."""
    from ._plotting import load_matplotlib, plot_format
    from .files import check_output_path

    # First the checks that make nothing.
    given = [(flag, path) for flag, path in (("--json", args.json), ("--markdown", args.markdown),
                                             ("--plot", args.plot)) if path is not None]
    if args.plot == STDOUT:
        raise ValueError("--plot -: an image does not go to standard output; give a file name")
    for i, (flag, path) in enumerate(given):
        for other, other_path in given[:i]:
            if path == other_path == STDOUT:
                raise ValueError(f"{other} and {flag} both name standard output (-)")
            # (A stream such as /dev/stdout takes both, one after the other.)
            if (os.path.realpath(path) == os.path.realpath(other_path)
                    and not _is_stream(path)):
                raise ValueError(f"{other} and {flag} name the same file {path}: the one "
                                 "written last would replace the other")
    if STDOUT in (args.json, args.markdown) and sys.stdout is None:
        flag = "--json" if args.json == STDOUT else "--markdown"
        raise ValueError(f"{flag} -: standard output is closed")
    for flag, path in given:
        descriptor = _OWN_NAMES.get(os.path.abspath(path))
        if descriptor is not None and not _descriptor_open(descriptor):
            what = "standard output" if descriptor == 1 else "standard error"
            raise ValueError(f"{flag} {path}: {what} is closed")
    if args.plot is not None:
        load_matplotlib()
        plot_format(args.plot)
    made = []
    try:
        for flag, path in given:
            if path == STDOUT:
                continue
            if _is_stream(path):  # written into: nothing is created next to it
                if not os.access(path, os.W_OK):
                    raise PermissionError(errno.EACCES, f"{flag}: cannot write {path}")
                continue
            try:
                # The directory is made if missing, as the writers would.
                made += _make_directory_of(path)
                # A stream (/dev/stdout) is written into, a file replaced.
                check_output_path(None, path, what=flag, replaced=False)
            except (OSError, ValueError) as exc:
                message = str(exc) if isinstance(exc, ValueError) else exc.strerror or str(exc)
                if not message.startswith(flag):
                    message = f"{flag}: {message}"
                raise (type(exc)(message) if isinstance(exc, ValueError) or exc.errno is None
                       else type(exc)(exc.errno, message)) from None
    except BaseException:
        _remove_directories(made)
        raise
    return made


def _descriptor_open(descriptor):
    try:
        os.fstat(descriptor)
    except OSError:
        return False
    return True


# An output path meaning standard output.
STDOUT = "-"


def _through_link(option, path):
    """The file a symbolic link names (followed all the way), else ``path``
    (a stream too: see _is_stream); a FileNotFoundError for a link into a
    directory that does not exist (which open() would not make either)."""
    if (path is None or path == STDOUT or not os.path.islink(path)
            or os.path.abspath(path) in _OWN_NAMES or _is_stream(path)):
        return path
    target = os.path.realpath(path)
    if not os.path.isdir(os.path.dirname(target)):
        raise FileNotFoundError(f"--{option}: cannot write {path}: it is a symbolic link to "
                                f"{target}, in a directory that does not exist")
    return target


# Names of this process's own standard output and error, which a closed
# descriptor leaves naming nothing.
_OWN_NAMES = {"/dev/stdout": 1, "/dev/fd/1": 1, "/proc/self/fd/1": 1,
              "/dev/stderr": 2, "/dev/fd/2": 2, "/proc/self/fd/2": 2}


def _own_descriptor(path):
    """1 or 2 where ``path`` (through any links: /dev/stdout, a link to it,
    /dev/fd/1) is this process's standard output or error, else None."""
    try:
        target = os.stat(path)
    except (OSError, ValueError):
        return None
    for descriptor in (1, 2):
        try:
            if os.path.samestat(target, os.fstat(descriptor)):
                return descriptor
        except OSError:  # closed
            pass
    return None


def _is_stream(path):
    """Whether ``path`` is written into rather than replaced as a whole: what
    is not a regular file (a FIFO, a terminal), and this process's standard
    output or error even where it is a regular file. `--json /dev/stdout >
    out.txt` names out.txt, which the shell holds open: replacing it, or
    opening it anew (from its start), would lose what is written around the
    JSON."""
    return (os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)) \
        or _own_descriptor(path) is not None


def _write_into(option, path, data):
    try:
        descriptor = _own_descriptor(path)
        if descriptor is None:
            with open(path, "wb") as f:
                f.write(data)
            return
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()  # what was printed before comes first
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
    except BrokenPipeError:
        raise  # the reader went away: the command ends quietly (cli.main)
    except OSError as exc:  # a full device, a closed stream: name the option
        raise OSError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None


def _write_outputs(args, bench, result, table):
    """Write --json, --markdown and --plot. Files are replaced together, once
    all of them are written (a failure leaves the old ones); devices and
    standard output are written into."""
    from .files import atomic_write_files

    texts = []
    if args.json:
        texts.append(("--json", args.json, json.dumps(result, indent=1) + "\n"))
    if args.markdown:
        texts.append(("--markdown", args.markdown,
                      f"Command: `{result['command']}`\n\n"
                      f"Machine: {bench.machine_summary(result)}\n\n{table}\n"))
    files = []
    for option, path, text in texts:
        if path == STDOUT:
            continue  # printed last (see run)
        # UTF-8 whatever the locale (the table has µ and ×); the command
        # keeps the bytes of a file name that is not UTF-8.
        data = text.encode("utf-8", "surrogateescape")
        if _is_stream(path):
            _write_into(option, path, data)
        else:
            files.append((path, lambda tmp, data=data: _write_bytes(tmp, data)))
    if args.plot:
        if _is_stream(args.plot):
            bench.plot(result, args.plot)
        else:
            files.append((args.plot, lambda tmp: bench.plot(result, tmp, fmt_path=args.plot)))
    if files:
        atomic_write_files(files)
    return [text for _, path, text in texts if path == STDOUT]


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def run(args):
    from . import bench

    if args.device == "cuda":
        bench.require_cuda()
    # Before any output directory is made, and named as the options.
    bench.check_settings(args.rounds, args.warmup_s, args.batch_ms, args.threads, options=True)
    modes = _split(args.modes, bench.MODES, "--modes")
    sides = _split(DEFAULT_SIDES if args.sides is None else args.sides, bench.SIDES, "--sides")
    sides = ["ours"] + [s for s in sides if s != "ours"]
    if "dense" in sides and not any(bench.sides_for(args.op, m, ["dense"]) for m in modes):
        if args.sides is not None:
            # Asked for by name: otherwise its column stays empty without a word.
            raise ValueError(f"--sides dense: --op {args.op} has no dense side in "
                             f"{', '.join(modes)} (a merged adapter cannot be trained); add "
                             "fwd to --modes or leave dense out")
        sides.remove("dense")  # the default sides: dense where there is one
    if args.plot is not None and len(sides) == 1:
        raise ValueError("--plot draws the ratios to the other sides, and --sides names "
                         "only ours")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    plan = []  # (shapes, dtypes) groups
    lora = args.op in bench.ADAPTER_OPS
    if args.shapes is None and args.dtype is None and args.device == "cuda" and not lora:
        plan = [(bench.DEFAULT_CUDA_SHAPES, list(bench.DEFAULT_CUDA_DTYPES)),
                (bench.DEFAULT_CUDA_FP32_SHAPES, ["float32"])]
    else:
        cuda = args.device == "cuda"
        defaults = ((bench.DEFAULT_CUDA_LORA_SHAPES if cuda else bench.DEFAULT_CPU_LORA_SHAPES)
                    if lora else
                    (bench.DEFAULT_CUDA_SHAPES if cuda else bench.DEFAULT_CPU_SHAPES))
        # An empty --shapes "" is an error, not the (long) defaults.
        shapes = (_named("--shapes", bench.parse_shapes, args.shapes)
                  if args.shapes is not None else defaults)
        _check_shape_sizes(shapes)
        dtypes = (_named("--dtype", bench.parse_dtypes, args.dtype) if args.dtype is not None else
                  list(bench.DEFAULT_CUDA_DTYPES if args.device == "cuda"
                       else bench.DEFAULT_CPU_DTYPES))
        plan = [(shapes, dtypes)]
    # An output given as a symbolic link is written where it points (the
    # link stays), as open() would; the writes replace files by renaming.
    for option in ("json", "markdown", "plot"):
        setattr(args, option, _through_link(option, getattr(args, option)))
    # Last of the checks: it makes the output directories, which a failure
    # from here on removes again where they are still empty.
    made = _check_outputs(args)
    try:
        return _time_and_write(args, bench, plan, modes, sides, log)
    except BaseException:
        _remove_directories(made)
        raise


def _time_and_write(args, bench, plan, modes, sides, log):
    """Time ``plan`` and write the outputs."""
    result = None
    for shapes, dtypes in plan:
        part = bench.run_benchmark(
            shapes, dtypes, device=args.device, modes=modes, sides=sides,
            rounds=args.rounds, warmup_s=args.warmup_s, batch_ms=args.batch_ms,
            threads=args.threads, rotate=not args.no_rotate, log=log, op=args.op)
        if result is None:
            result = part
        else:
            result["results"].extend(part["results"])

    table = bench.markdown_table(result)

    def print_summary(stream):
        print(f"Machine: {bench.machine_summary(result)}", file=stream)
        print(f"Command: {result['command']}", file=stream)
        print(table, file=stream)

    # The files first: a reader of standard output that has gone away
    # (`| head -1`) or cannot take µ must not cost the run's files.
    try:
        to_stdout = _write_outputs(args, bench, result, table)
    except BaseException:
        # The files failed (a full disk): the figures are not lost with them.
        print_summary(sys.stderr)
        raise
    # With --json - or --markdown -, standard output is theirs.
    print_summary(sys.stderr if to_stdout else sys.stdout)
    noisy = bench.noisy_entries(result)
    if noisy:
        print(f"Noisy: the slowest sample took over {bench.NOISY_SPREAD:g}× the fastest at "
              f"{'; '.join(noisy)}; rerun on a quieter machine before trusting those ratios",
              file=sys.stderr)
    busy = bench.busy_entries(result)
    if busy:
        print(f"Busy: other work took over {bench.BUSY_OTHER_LOAD:g} of a core while timing "
              f"{'; '.join(busy)}; rerun on an idle machine before trusting those ratios",
              file=sys.stderr)
    for text in to_stdout:
        # The bytes a file gets (UTF-8 whatever the stream's encoding).
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:
            sys.stdout.write(text)
        else:
            sys.stdout.flush()
            buffer.write(text.encode("utf-8", "surrogateescape"))
            buffer.flush()
    return 0
