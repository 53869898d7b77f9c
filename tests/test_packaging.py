"""The source distribution builds on its own: every file under csrc/ and the tests are in it."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

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
