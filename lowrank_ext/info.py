"""backend_info(): which kernels are in use, and why."""

from __future__ import annotations

import torch

from . import _backend
from ._version import __version__

_OPS = ("lowrank_linear", "lora_linear", "svd_truncate")


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_ext::{op}", key)


def backend_info() -> dict:
    """A dict describing the active backend.

    Keys: ``compiled`` (the C++ extension is loaded), ``cpu`` / ``cuda`` (compiled
    kernels for that device are registered and active; ``cuda`` also needs a GPU),
    ``cuda_built`` (the build contains CUDA kernels; None when the extension
    is not loaded, so nobody asked it), ``fallback_reason``
    (None, or why the pure-torch kernels are in use), ``version``, ``torch``,
    ``cuda_available``, ``built_with_torch``, ``cpu_capability``, ``cpu_kernels``
    (the compiled CPU kernel set in use: ``"avx512bf16"``, ``"avx2"``,
    ``"portable"``, or None without them), ``cpu_prefault``,
    ``cpu_widened_half`` (the half types whose CPU products around the fused
    kernel run on float32 copies, or None without compiled kernels),
    ``num_threads`` and ``kernels`` (op -> devices with a compiled kernel).
    """
    compiled = _backend.compiled
    kernels = {
        op: [dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if compiled and _has_kernel(op, key)]
        for op in _OPS
    }
    # Unknown (None) when the extension is not loaded (forced fallback, no build).
    cuda_built = bool(_backend.build_info.get("cuda", False)) if compiled else None
    return {
        "compiled": compiled,
        "cpu": compiled and "cpu" in kernels["lowrank_linear"],
        # Active means usable now: built, registered, and a GPU to run on.
        "cuda": compiled and cuda_built and "cuda" in kernels["lowrank_linear"]
        and torch.cuda.is_available(),
        "cuda_built": cuda_built,
        "fallback_reason": _backend.fallback_reason,
        "version": __version__,
        "torch": torch.__version__,
        "built_with_torch": _backend.build_info.get("torch_version"),
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": torch.ops.lowrank_ext._cpu_kernel("") if compiled and "cpu" in
        kernels["lowrank_linear"] else None,
        # Whether fresh large CPU outputs are mapped with one madvise call.
        "cpu_prefault": torch.ops.lowrank_ext._cpu_prefault() if compiled and "cpu" in
        kernels["lowrank_linear"] else None,
        # Which half types' CPU products around the fused kernel (backward,
        # lora_linear's dense product) run on float32 copies, because ATen's
        # GEMM in that type is slow on this CPU (LOWRANK_EXT_WIDEN_HALF).
        "cpu_widened_half": [name for name, dtype in (("float16", torch.float16),
                                                      ("bfloat16", torch.bfloat16))
                             if torch.ops.lowrank_ext._cpu_widen_half(dtype)]
        if compiled and "cpu" in kernels["lowrank_linear"] else None,
        "num_threads": torch.get_num_threads(),
        "kernels": kernels,
    }
