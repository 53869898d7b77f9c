"""The CUDA kernels, run without a GPU on an emulated one.

`tests/cuda_emulation` compiles `csrc/cuda/tensor_core_fused.cuh` and
`csrc/cuda/split_k.cuh` unchanged with the host compiler, against small
stand-ins for CUDA's headers: every GPU thread is a host thread, barriers and
warp shuffles are modelled, WMMA is computed per warp, shared memory starts as
NaN in every block and is bounded by what the plan asked for, and cp.async
copies land either at once or as late as the rules allow. Each case runs a
path that `make_plan` (csrc/cuda/lowrank_plan.cpp) tiles for a described GPU,
and every output is checked against a float64 reference.

This checks the kernels' indexing, tails, tiling, shared-memory layout and
synchronisation; it does not check their speed, nor what only hardware
decides (the real WMMA fragment layout, memory ordering between blocks). The
GPU tests in test_cuda.py do that where a GPU is present.
"""

import os
import random
import shutil
import subprocess
import sys

import pytest
from conftest import FORCED_FALLBACK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")
CUDA_SOURCES = os.path.join(ROOT, "csrc", "cuda")

CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")

pytestmark = [
    pytest.mark.skipif(CXX is None or not sys.platform.startswith("linux"),
                       reason="needs a C++20 compiler on Linux"),
    # The emulated kernels do not depend on which Python backend is active:
    # the compiled pass of the test run checks them once.
    pytest.mark.skipif(FORCED_FALLBACK, reason="backend-independent; runs in the compiled pass"),
]

BASE_FLAGS = ["-std=c++20", "-O1", "-g", "-pthread", "-Wall", "-Wno-unknown-pragmas",
              "-I", os.path.join(EMULATION, "shim"), "-I", CUDA_SOURCES]
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
              "-fno-omit-frame-pointer"]
SOURCES = [os.path.join(EMULATION, "run_kernels.cpp"),
           os.path.join(CUDA_SOURCES, "lowrank_plan.cpp")]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The compiled runner, with AddressSanitizer and UBSan where they link."""
    out = str(tmp_path_factory.mktemp("cuda_emulation") / "run_kernels")
    errors = []
    for flags in (BASE_FLAGS + SANITIZERS, BASE_FLAGS):
        result = subprocess.run([CXX, *flags, *SOURCES, "-o", out],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return out
        errors.append(result.stderr[-3000:])
    # Without the sanitizers too: the sources (or the compiler) are at fault.
    pytest.fail("the CUDA emulation does not compile:\n" + "\n".join(errors))


def run_cases(emulator, cases, timeout=900):
    """Runs the cases (tuples of run_kernels.cpp's fields); fails on any FAIL."""
    lines = [" ".join(str(int(v)) if isinstance(v, bool) else str(v) for v in case)
             for case in cases]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0")
    result = subprocess.run([emulator], input="\n".join(lines) + "\n", capture_output=True,
                            text=True, timeout=timeout, env=env)
    passed = [line for line in result.stdout.splitlines() if line.startswith("PASS")]
    failed = [line for line in result.stdout.splitlines() if not line.startswith("PASS")]
    assert result.returncode == 0 and not failed and len(passed) == len(lines), (
        f"exit status {result.returncode}\n" + "\n".join(failed) + "\n"
        + result.stderr[-4000:])
    return passed


def case(path, dtype, M, k, r, d, *, ldx_extra=0, misalign=False, bias=True, keep_t=True,
         timing="issue", device="h100", inputs="finite"):
    return (path, dtype, M, k, r, d, ldx_extra, misalign, bias, keep_t, timing, device, inputs)


HALF = ["float16", "bfloat16"]
ALL = ["float64", "float32", "float16", "bfloat16"]


# --- the fused tensor-core kernel ------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("r", [1, 2, 8, 16, 17, 32, 33, 64, 65, 128, 129, 256])
def test_tensor_core_every_rank_bracket(emulator, dtype, r):
    # Each bracket of fragments per warp (1, 2, 4, 8) and warps along r (1, 2),
    # at a rank on the bracket's edge and one past it; tails in M, k and d.
    run_cases(emulator, [case("tensor_core", dtype, 67, 72, r, 70, timing="wait")])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64, 65, 130])
def test_tensor_core_row_tails(emulator, dtype, M):
    run_cases(emulator, [case("tensor_core", dtype, M, 24, 16, 24)])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("k,d", [(1, 1), (7, 9), (8, 8), (63, 65), (64, 64), (65, 63),
                                 (129, 130), (200, 8)])
def test_tensor_core_k_and_d_tails(emulator, dtype, k, d):
    run_cases(emulator, [case("tensor_core", dtype, 20, k, 24, d, timing="wait"),
                         case("tensor_core", dtype, 20, k, 24, d, bias=False, keep_t=False)])


@pytest.mark.parametrize("timing", ["issue", "wait"])
@pytest.mark.parametrize("device,r,stages", [("h100", 64, 3), ("h100", 256, 3), ("a100", 256, 2),
                                             ("small", 64, 3), ("small", 128, 2)])
def test_tensor_core_ring_stages_and_copy_timing(emulator, timing, device, r, stages):
    # Rings of three and of two slots (the plan's choice for these devices,
    # checked in test_cuda.py's tiling tests); copies landing as late as
    # allowed expose a slice read before its wait.
    [passed] = run_cases(emulator, [case("tensor_core", "bfloat16", 65, 300, r, 150,
                                         timing=timing, device=device)])
    assert f"{stages} ring slots" in passed


@pytest.mark.parametrize("dtype", HALF)
def test_tensor_core_strided_and_misaligned_operands(emulator, dtype):
    # Misaligned buffers and row strides that are not multiples of 8 elements
    # take the element-by-element copies instead of cp.async.
    run_cases(emulator, [
        case("tensor_core", dtype, 70, 96, 40, 72, ldx_extra=8, timing="wait"),
        case("tensor_core", dtype, 70, 96, 40, 72, ldx_extra=3),
        case("tensor_core", dtype, 70, 96, 40, 72, misalign=True),
        case("tensor_core", dtype, 70, 97, 41, 71, ldx_extra=5, misalign=True, bias=False),
    ])


@pytest.mark.parametrize("path,M", [("tensor_core", 70), ("split_k", 5)])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("r", [8, 20, 32, 100])
def test_an_infinite_input_gives_infinite_outputs_not_nan(emulator, path, M, r, dtype):
    # x[0, 0] = +inf with every other input in [0, 1): row 0 of t and y is
    # +inf. The rank padding of the tensor-core tile (r not a multiple of
    # its fragments) must not turn it into NaN through inf * 0.
    run_cases(emulator, [case(path, dtype, M, 40, r, 48, inputs="inf"),
                         case(path, dtype, M, 40, r, 48, inputs="inf", bias=False)])


# --- split-K (few rows) -----------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("M", [1, 3, 16, 17])
def test_split_k_rows(emulator, dtype, M):
    run_cases(emulator, [case("split_k", dtype, M, 1000, 24, 100, timing="wait")])


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 4096])
def test_split_k_reduction_lengths(emulator, dtype, k):
    run_cases(emulator, [case("split_k", dtype, 2, k, 9, 40)])


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("r", [1, 2, 3, 8, 9, 33, 256])
def test_split_k_ranks_and_lanes_per_column(emulator, dtype, r):
    run_cases(emulator, [case("split_k", dtype, 4, 300, r, 67, ldx_extra=1, misalign=True,
                              device="small")])


@pytest.mark.parametrize("dtype", ALL)
def test_split_k_outputs_wider_than_one_block(emulator, dtype):
    run_cases(emulator, [case("split_k", dtype, 5, 64, 16, 1000, bias=False, device="small"),
                         case("split_k", dtype, 1, 64, 16, 1, keep_t=False)])


# --- random shapes ------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(emulator, seed):
    rng = random.Random(seed)
    cases = []
    for _ in range(4):
        path = rng.choice(["tensor_core", "split_k"])
        dtype = rng.choice(HALF if path == "tensor_core" else ALL)
        # (the plan picks split-K for up to 16 rows; test_split_k_rows goes past it)
        M = rng.randint(1, 140 if path == "tensor_core" else 16)
        r = rng.randint(1, 256)
        cases.append(case(
            path, dtype, M, rng.randint(1, 300), r, rng.randint(1, 200),
            ldx_extra=rng.choice([0, 0, 1, 8]), misalign=rng.random() < 0.3,
            bias=rng.random() < 0.7, keep_t=rng.random() < 0.5,
            timing=rng.choice(["issue", "wait"]), device=rng.choice(["h100", "a100"] + (["small"] if r <= 128 else []))))
    run_cases(emulator, cases)
