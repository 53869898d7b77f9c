"""Build script for lowrank_ext.

Environment variables:
  LOWRANK_EXT_BUILD=0     skip all C++/CUDA code: a pure-Python install that
                          runs on the pure-torch fallback.
  LOWRANK_EXT_CUDA=1|0    force or skip the CUDA kernels. By default they are
                          built when torch has CUDA (torch.version.cuda) and a
                          CUDA toolkit is found; no GPU is needed to build.
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0+PTX").
  MAX_JOBS                parallel compile jobs (ninja).
  LOWRANK_EXT_DEBUG=1     build with -O0 -g.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _env_flag(name):
    """True/False for an explicit 1/0 in the environment, None when unset
    (or set to something else, which is named rather than ignored silently)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        _log(f"{name}={os.environ[name]!r} is not one of 1/true/yes/on or 0/false/no/off; "
             "it is ignored")
    return None


def _log(msg):
    print(f"lowrank_ext setup: {msg}", file=sys.stderr)


def _want_cuda(torch, cuda_home, cuda_sources):
    forced = _env_flag("LOWRANK_EXT_CUDA")
    if forced is False:
        _log("LOWRANK_EXT_CUDA=0: skipping CUDA kernels")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append("this torch has no CUDA support")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if not cuda_sources:
        reasons.append("no CUDA sources in csrc/cuda")
    if reasons and forced:
        raise RuntimeError("LOWRANK_EXT_CUDA=1 but " + "; ".join(reasons))
    if reasons:
        _log("building without CUDA: " + "; ".join(reasons))
        return False
    return True


def get_extensions():
    if _env_flag("LOWRANK_EXT_BUILD") is False:
        _log("LOWRANK_EXT_BUILD=0: pure-Python install (pure-torch fallback)")
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable: pure-Python install. Install torch first and "
             "build with `pip install --no-build-isolation -e .`")
        return []

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    debug = _env_flag("LOWRANK_EXT_DEBUG") is True
    opt = ["-O0", "-g"] if debug else ["-O3"]
    define_macros = [("LOWRANK_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need.
    cxx_flags = opt + ["-fopenmp", "-fvisibility=hidden"]
    extra_link_args = ["-fopenmp"]

    if _want_cuda(torch, CUDA_HOME, cuda_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _log(f"building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} "
             f"with the toolkit at {CUDA_HOME}")
        define_macros.append(("LOWRANK_EXT_WITH_CUDA", None))
        nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "lowrank_ext._C",
                sources + cuda_sources,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=extra_link_args,
            )
        ]
    return [
        CppExtension(
            "lowrank_ext._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    ]


def _cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


setup(ext_modules=get_extensions(), cmdclass=_cmdclass())
