"""The source distribution builds on its own: every file under csrc/ and the tests are in it."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import FORCED_FALLBACK, requires_compiled

ROOT = Path(__file__).resolve().parents[1]


def _sources(folder):
    """Files a build or a test run reads, as paths relative to the repository root."""
    suffixes = {".cpp", ".cu", ".h", ".cuh", ".py", ".md"}
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
            if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts}


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_sdist_holds_every_source_and_header(tmp_path):
    # egg-info and the archive go to tmp_path: the source tree is left untouched.
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
         "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (archive,) = tmp_path.glob("lowrank_ext-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = _sources("csrc") | _sources("tests") | _sources("lowrank_ext")
    wanted |= {"setup.py", "pyproject.toml", "README.md", "lowrank_ext/py.typed"}
    missing = sorted(wanted - packed)
    assert not missing, f"missing from the sdist: {missing}"
    assert not [n for n in packed if n.endswith((".so", ".pyc", ".o"))]


# C++20 library features and keywords the compilers of supported torch releases
# may not be given: torch 2.11 builds extensions with -std=c++17, the torch
# here with -std=c++20 (so a build here cannot catch them).
_CPP20_ONLY = re.compile(
    r"make_unique_for_overwrite|make_shared_for_overwrite|std::span\b|#include <(span|bit|"
    r"ranges|concepts|format|numbers|compare|source_location|barrier|latch|semaphore)>|"
    r"std::bit_cast|std::ranges|std::format\b|std::numbers|std::ssize|std::midpoint|"
    r"std::lerp|std::erase_if|\.contains\(|\.starts_with\(|\.ends_with\(|"
    r"\bconsteval\b|\bconstinit\b|\bco_await\b|\bco_return\b|\bco_yield\b|"
    r"\bconcept\b|\bchar8_t\b|<=>|\[\[(un)?likely\]\]|\busing enum\b")


def _without_comments(code):
    code = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), code, flags=re.S)
    return re.sub(r"//[^\n]*", "", code)


@pytest.mark.skipif(not (ROOT / "csrc").exists(), reason="needs the source tree")
def test_the_sources_stay_within_cpp17():
    found = []
    # (The CUDA emulation's host shim is built by its test with -std=c++20.)
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in {".cpp", ".cu", ".h", ".cuh"}:
            code = _without_comments(path.read_text(encoding="utf-8"))
            for line_number, line in enumerate(code.splitlines(), 1):
                if _CPP20_ONLY.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{line_number}: {line.strip()}")
    assert not found, "C++20 only (torch 2.11 builds as C++17):\n" + "\n".join(found)


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_a_misspelt_build_switch_is_named_not_ignored_silently(tmp_path):
    # LOWRANK_EXT_BUILD=disable built the extension without a word, where the
    # package names every misspelt setting it reads at run time.
    import os

    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "LOWRANK_EXT_BUILD": "disable", "LOWRANK_EXT_CUDA": "0"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LOWRANK_EXT_BUILD='disable' is not one of" in run.stderr, run.stderr[-2000:]
    assert "LOWRANK_EXT_CUDA='" not in run.stderr  # a valid value is not named


def _setup_py(args, tmp_path, env=None):
    import os

    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "LOWRANK_EXT_CUDA": "0", **(env or {})})


def _requirements(tmp_path, env=None):
    tmp_path.mkdir(exist_ok=True)
    run = _setup_py(["-q", "egg_info", "--egg-base", str(tmp_path)], tmp_path, env)
    assert run.returncode == 0, run.stderr[-2000:]
    (requires,) = tmp_path.glob("*.egg-info/requires.txt")
    return requires.read_text().split("\n\n")[0].split()


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_a_build_without_torch_fails_and_names_the_way_out(tmp_path):
    # pip's isolated build environment has no torch: the build gave a
    # pure-Python wheel without a word (pip caches it and installs it again
    # for a later --no-build-isolation install), and the package ran on the
    # fallback. Metadata and the sdist still need no torch.
    no_torch = tmp_path / "no_torch"
    (no_torch / "torch").mkdir(parents=True)
    (no_torch / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = {"PYTHONPATH": str(no_torch)}
    assert "torch>=2.11" in _requirements(tmp_path, env)
    build = ["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
             str(tmp_path / "temp")]
    run = _setup_py(build, tmp_path, env)
    assert run.returncode != 0
    message = " ".join((run.stdout + run.stderr).split())
    assert "torch is not importable" in message and "--no-build-isolation" in message
    assert "LOWRANK_EXT_BUILD=0" in message
    run = _setup_py(build, tmp_path, {**env, "LOWRANK_EXT_BUILD": "0"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert not list((tmp_path / "lib").rglob("_C*"))


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_a_compiled_build_requires_the_torch_it_was_built_against(tmp_path):
    # It asked for torch>=2.4: pip paired the binary with any torch, whose
    # other binary interface left the package on the fallback.
    import torch

    release = torch.__version__.split("+")[0]
    assert f"torch=={release}" in _requirements(tmp_path / "compiled")
    assert "torch>=2.11" in _requirements(tmp_path / "pure", {"LOWRANK_EXT_BUILD": "0"})


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_the_cuda_toolkit_behind_a_linked_nvcc_is_found(tmp_path, monkeypatch):
    # torch takes the folder above the first nvcc on PATH: for one linked
    # from /usr/local/bin that is /usr/local, where linking found no libcudart.
    import runpy

    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    toolkit = tmp_path / "cuda-13.0"
    for name in ("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so"):
        (toolkit / name).parent.mkdir(parents=True, exist_ok=True)
        (toolkit / name).write_text("")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    linked = tmp_path / "local"
    (linked / "bin").mkdir(parents=True)
    (linked / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(linked / "bin"))
    assert setup["is_cuda_toolkit"](str(toolkit)) and not setup["is_cuda_toolkit"](str(linked))
    assert setup["find_cuda_toolkit"](str(linked)) == str(toolkit)
    assert setup["find_cuda_toolkit"](str(toolkit)) == str(toolkit)


@requires_compiled
@pytest.mark.skipif(FORCED_FALLBACK, reason="built and checked once, in the compiled run")
@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
@pytest.mark.skipif(sys.platform != "linux", reason="built here with the compiler of Linux")
def test_a_build_without_the_x86_kernels_runs_every_cpu_path(tmp_path):
    # As on aarch64 (or with another compiler), where the x86 micro-kernels and
    # their feature checks are left out: the package must still build, load
    # and compute on the portable kernels. LOWRANK_EXT_PORTABLE=1 makes that
    # build on this machine (CPU code only, about a minute on 2 cores).
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    shutil.copytree(ROOT / "lowrank_ext", tmp_path / "lowrank_ext",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {**os.environ, "LOWRANK_EXT_PORTABLE": "1", "LOWRANK_EXT_CUDA": "0"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_EXT_FORCE_FALLBACK"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT / "tests")])
    check = subprocess.run([sys.executable, str(ROOT / "tests" / "portable_build_check.py"),
                            str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    assert "portable build: ok" in check.stdout

