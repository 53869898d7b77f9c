"""Loads the compiled extension, or records why the pure-torch fallback is used.

Importing ``lowrank_ext._C`` registers the compiled CPU (and CUDA) kernels with
the dispatcher. Nothing here raises: a missing or broken build leaves
``_C = None`` and ``fallback_reason`` set, and the package keeps working on the
pure-torch kernels.
"""

import importlib
import importlib.util
import logging
import os

import torch

log = logging.getLogger("lowrank_ext")

FORCE_FALLBACK_ENV = "LOWRANK_EXT_FORCE_FALLBACK"

_C = None
fallback_reason = None

if os.environ.get(FORCE_FALLBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    fallback_reason = f"{FORCE_FALLBACK_ENV}={os.environ[FORCE_FALLBACK_ENV]} is set"
else:
    if importlib.util.find_spec("lowrank_ext._C") is None:
        fallback_reason = (
            "the compiled extension lowrank_ext._C is not built; install with "
            "`pip install --no-build-isolation -e .` to build it")
    else:
        try:
            # Importing it registers the compiled kernels with the dispatcher.
            _C = importlib.import_module("lowrank_ext._C")
        except Exception as exc:  # ImportError from a mismatched build, OSError, ...
            fallback_reason = f"lowrank_ext._C failed to load: {type(exc).__name__}: {exc}"

if fallback_reason is not None:
    log.info("lowrank_ext: using the pure-torch fallback: %s", fallback_reason)

compiled = _C is not None
build_info = dict(_C.build_info()) if compiled else {}
if compiled and build_info.get("torch_version") != torch.__version__:
    log.warning(
        "lowrank_ext._C was built against torch %s but torch %s is running; "
        "rebuild with `pip install --no-build-isolation -e .` if anything misbehaves",
        build_info.get("torch_version"), torch.__version__,
    )
