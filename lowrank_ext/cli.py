"""``python -m lowrank_ext <command>``: the command-line interface.

Each command lives in its own module with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; those modules import heavy dependencies inside
``run`` so that ``--help`` and ``info`` stay fast.
"""

import argparse
import contextlib
import importlib
import os
import signal
import sys

from ._names import first_line

# command name -> module implementing it
COMMANDS = {
    "bench": "lowrank_ext.bench_cli",
    "compress": "lowrank_ext.compress_cli",
    "demo": "lowrank_ext.demo",
    "info": "lowrank_ext.info_cli",
    "spectrum": "lowrank_ext.spectrum_cli",
}

# Errors a user can cause (bad arguments, bad files); anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, KeyError)


TRACEBACK_HELP = "show the full traceback when a command fails"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m lowrank_ext",
        description="Fused low-rank linear layers for PyTorch.")
    parser.add_argument("--traceback", action="store_true", help=TRACEBACK_HELP)
    # Also accepted after the command; SUPPRESS keeps the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help=TRACEBACK_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common])
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


@contextlib.contextmanager
def _escaping_streams():
    """While a command runs: output that a stream's encoding cannot hold (µ,
    ×, σ under LANG=C or a Windows code page; a file name that is not UTF-8,
    echoed in a message or a recorded command) is escaped rather than
    aborting the command, and a closed stderr (``2>&-``) swallows progress
    and errors rather than sending them into stdout, where
    ``print(file=None)`` would. The caller's streams are put back after."""
    closed_stderr = sys.stderr is None
    if closed_stderr:
        sys.stderr = open(os.devnull, "w")
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if (stream is not None and getattr(stream, "errors", None) == "strict"
                and hasattr(stream, "reconfigure")):
            try:
                stream.reconfigure(errors="backslashreplace")
                changed.append(stream)
            except (ValueError, OSError):  # a closed or detached stream
                pass
    try:
        yield
    finally:
        for stream in changed:
            try:
                stream.reconfigure(errors="strict")
            except (ValueError, OSError):
                pass
        if closed_stderr:
            sys.stderr.close()
            sys.stderr = None


class _Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``) while a command runs, raised so that
    the cleanup of partly written outputs runs as it does for Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_exception():
    def terminated(signum, frame):
        raise _Terminated()

    try:  # only where SIGTERM still kills (its default) and from the main thread
        replace = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        previous = signal.signal(signal.SIGTERM, terminated) if replace else None
    except ValueError:  # not the main thread of the main interpreter
        replace = False
    try:
        yield
    finally:
        if replace:
            signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    with _escaping_streams(), _terminate_as_exception():
        return _main(argv)


def _main(argv):
    args = None
    try:
        # Inside the try: building the parser imports the commands, which a
        # Ctrl-C may interrupt too.
        args = build_parser().parse_args(argv)
        status = int(args._run(args) or 0)
        if sys.stdout is not None:
            # Here, not at exit: a reader gone away (`| true`) is caught below.
            sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        command = f" {args.command}" if args is not None else ""
        print(f"lowrank_ext{command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        command = f" {args.command}" if args is not None else ""
        print(f"lowrank_ext{command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader went away (`... | head`): nothing more to say, and
        # nothing left to flush at exit either.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor
            pass
        return 1
    except USER_ERRORS as exc:
        if args is None or args.traceback:
            raise
        message = first_line(exc)
        print(f"lowrank_ext {args.command}: error: {message}", file=sys.stderr)
        return 1
