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
  LOWRANK_EXT_PORTABLE=1  leave the x86 micro-kernels out (as on aarch64, where
                          they are never built): every CPU call takes the
                          portable kernels. For testing that build.

A compiled build requires the very torch it was compiled against (the
extension's binary interface is that of one torch release); a pure-Python
install (LOWRANK_EXT_BUILD=0) any torch from TORCH_FLOOR.
"""

import glob
import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# The oldest torch the package runs on (torch.library.register_vmap and the
# custom-op APIs it uses).
TORCH_FLOOR = "2.11"
DEPENDENCIES = ["numpy", "safetensors>=0.4", "tqdm>=4.60"]
NO_TORCH = (
    "torch is not importable where lowrank_ext is being built. The extension is compiled "
    "against the torch it will run with, so install torch first and build without pip's "
    "isolated build environment (which has no torch): `pip install --no-build-isolation "
    "--no-cache-dir lowrank_ext` (`pip install --no-build-isolation -e .` in a checkout). "
    "Or set LOWRANK_EXT_BUILD=0 for a pure-Python install that runs on the pure-torch "
    "fallback.")



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


def is_cuda_toolkit(path):
    """Whether ``path`` holds a CUDA toolkit to compile and link with: nvcc,
    the runtime's header and its library."""
    if not path:
        return False
    libraries = [name for lib in ("lib64", "lib")
                 for name in glob.glob(os.path.join(path, lib, "libcudart*"))]
    return (os.path.isfile(os.path.join(path, "bin", "nvcc"))
            and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
            and bool(libraries))


def find_cuda_toolkit(torch_cuda_home):
    """The toolkit to build with: torch's choice (CUDA_HOME, or the folder
    above the nvcc on PATH) where it is a whole toolkit, else the toolkit an
    nvcc on PATH resolves to through links (an nvcc in /usr/local/bin that
    stands for /usr/local/cuda-13.0/bin/nvcc made torch pick /usr/local, where
    linking found no libcudart), else /usr/local/cuda; None when none is."""
    candidates = [torch_cuda_home]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if is_cuda_toolkit(c)), None)


def _want_cuda(torch, cuda_home, cuda_sources):
    forced = _env_flag("LOWRANK_EXT_CUDA")
    if forced is False:
        _log("LOWRANK_EXT_CUDA=0: skipping CUDA kernels")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append("this torch has no CUDA support")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME to one, e.g. /usr/local/cuda)")
    if not cuda_sources:
        reasons.append("no CUDA sources in csrc/cuda")
    if reasons and forced:
        raise RuntimeError("LOWRANK_EXT_CUDA=1 but " + "; ".join(reasons))
    if reasons:
        _log("building without CUDA: " + "; ".join(reasons))
        return False
    return True


class NoTorchBuildExt(build_ext):
    """Fails the build where torch is missing (pip's isolated build
    environment), naming the way out: a pure-Python wheel built there would
    be installed, and cached, as if it were the compiled one."""

    def run(self):
        raise SystemExit(f"error: {NO_TORCH}")


def get_extensions():
    """(extensions, build_ext command, torch requirement)."""
    if _env_flag("LOWRANK_EXT_BUILD") is False:
        _log("LOWRANK_EXT_BUILD=0: pure-Python install (pure-torch fallback)")
        return [], None, f"torch>={TORCH_FLOOR}"
    try:
        import torch
        import torch.utils.cpp_extension as cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # Metadata and the sdist need no torch; building the extension does.
        return ([Extension("lowrank_ext._C", sources=[])], NoTorchBuildExt,
                f"torch>={TORCH_FLOOR}")
    command = BuildExtension.with_options(no_python_abi_suffix=True)
    # The release this binary works with (any local build label: +cpu, +cu130).
    requirement = f"torch=={torch.__version__.split('+')[0]}"

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    debug = _env_flag("LOWRANK_EXT_DEBUG") is True
    # -g0 after Python's own flags (which hold -g): no debug info in a release
    # build, 1 MB instead of 30.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    define_macros = [("LOWRANK_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    if _env_flag("LOWRANK_EXT_PORTABLE") is True:
        _log("LOWRANK_EXT_PORTABLE=1: leaving the x86 CPU kernels out")
        define_macros.append(("LOWRANK_EXT_NO_X86_KERNELS", None))
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need.
    cxx_flags = opt + ["-fvisibility=hidden"]
    extra_link_args = []
    if sys.platform == "darwin":
        # Apple's clang has no -fopenmp; at::parallel_for then runs each
        # call's loop on the calling thread (results are the same).
        _log("macOS: building without OpenMP (each CPU call runs on one thread)")
    else:
        cxx_flags.append("-fopenmp")
        extra_link_args.append("-fopenmp")

    cuda_home = find_cuda_toolkit(cpp_extension.CUDA_HOME) if torch.version.cuda else None
    if _want_cuda(torch, cuda_home, cuda_sources):
        if cuda_home != cpp_extension.CUDA_HOME:
            _log(f"the CUDA toolkit is at {cuda_home}, not at {cpp_extension.CUDA_HOME}; "
                 "building with it")
            # torch's build helpers read their module's CUDA_HOME.
            cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _log(f"building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} "
             f"with the toolkit at {cuda_home}")
        define_macros.append(("LOWRANK_EXT_WITH_CUDA", None))
        nvcc_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["--expt-relaxed-constexpr",
                                                               "-lineinfo"]
        extension = CUDAExtension(
            "lowrank_ext._C",
            sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
    else:
        extension = CppExtension(
            "lowrank_ext._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    return [extension], command, requirement


if __name__ == "__main__":  # (setuptools' build backend runs this file as __main__)
    extensions, command, torch_requirement = get_extensions()
    setup(ext_modules=extensions, cmdclass={"build_ext": command} if command else {},
          install_requires=[torch_requirement, *DEPENDENCIES])
