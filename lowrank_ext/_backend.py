"""Loads the compiled extension, or records why the pure-torch fallback is used.

Importing ``lowrank_ext._C`` registers the compiled CPU (and CUDA) kernels with
the dispatcher. Nothing here raises: a missing or broken build leaves
``_C = None`` and ``fallback_reason`` set, and the package keeps working on the
pure-torch kernels.
"""

import importlib
import importlib.machinery
import logging
import os

import torch

log = logging.getLogger("lowrank_ext")

FORCE_FALLBACK_ENV = "LOWRANK_EXT_FORCE_FALLBACK"
# Builds the installed package again against the torch at hand, and nothing
# else (without --no-deps, --force-reinstall would fetch torch again too).
REBUILD = ("pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps "
           "lowrank_ext")

_C = None
fallback_reason = None
_failed_to_load = False  # a build that is there but does not load

if os.environ.get(FORCE_FALLBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    fallback_reason = f"{FORCE_FALLBACK_ENV}={os.environ[FORCE_FALLBACK_ENV]} is set"
else:
    # Only a _C next to these files counts: an editable install of another
    # checkout must not lend its build to this one.
    _here = [os.path.dirname(os.path.abspath(__file__))]
    if importlib.machinery.PathFinder.find_spec("lowrank_ext._C", _here) is None:
        # (A pure-Python install, LOWRANK_EXT_BUILD=0, or a checkout not built.)
        fallback_reason = (
            "the compiled extension lowrank_ext._C is not built; build it with "
            f"`{REBUILD}` (`pip install --no-build-isolation -e .` in a checkout)")
    else:
        try:
            # Importing it registers the compiled kernels with the dispatcher.
            _C = importlib.import_module("lowrank_ext._C")
        except Exception as exc:  # ImportError from a mismatched build, OSError, ...
            _failed_to_load = True
            fallback_reason = (
                f"lowrank_ext._C failed to load: {type(exc).__name__}: {exc}. An undefined "
                f"symbol usually means torch changed since the build (torch "
                f"{torch.__version__} is running): rebuild with `{REBUILD}` "
                "(`pip install --no-build-isolation -e .` in a checkout)")

if fallback_reason is not None:
    # A build that is there but does not load is an accident the user must
    # hear of (every op then runs on the slower fallback); no build at all, or
    # the fallback asked for, is a choice.
    (log.warning if _failed_to_load else log.info)(
        "lowrank_ext: using the pure-torch fallback: %s", fallback_reason)

# The settings read from the environment, with the values each understands;
# a misspelt value would otherwise be ignored without a word.
ENV_SETTINGS = {
    FORCE_FALLBACK_ENV: ("", "0", "1", "true", "false", "yes", "no", "on", "off"),
    "LOWRANK_EXT_CPU_KERNEL": ("", "auto", "avx2", "portable"),
    "LOWRANK_EXT_WIDEN_HALF": ("", "0", "1"),
    "LOWRANK_EXT_PREFAULT": ("", "0", "1"),
}
for _name, _allowed in ENV_SETTINGS.items():
    _value = os.environ.get(_name)
    # The C++ kernels compare their settings exactly; the fallback switch is lenient.
    _seen = _value.strip().lower() if _name == FORCE_FALLBACK_ENV and _value else _value
    if _value is not None and _seen not in _allowed:
        log.warning("lowrank_ext: %s=%r is not one of %s; it is ignored", _name, _value,
                    ", ".join(repr(v) for v in _allowed if v))

compiled = _C is not None
build_info = dict(_C.build_info()) if compiled else {}
if compiled and build_info.get("torch_version") != torch.__version__:
    log.warning(
        "lowrank_ext._C was built against torch %s but torch %s is running; "
        "rebuild with `pip install --no-build-isolation -e .` if anything misbehaves",
        build_info.get("torch_version"), torch.__version__,
    )
