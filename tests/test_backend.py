"""Backend selection, the forced fallback, a pure-Python install, and the CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_ext as lx

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env_extra=None, cwd=None, timeout=300):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_importing_the_package_leaves_torch_compile_unloaded():
    """Applying torch.compiler.disable at import time loaded torch._dynamo,
    a second on every `import lowrank_ext` (and every CLI command) of a
    process that never compiles anything."""
    result = _run(["-c", "import sys, lowrank_ext, lowrank_ext.nn, lowrank_ext.compress, "
                         "lowrank_ext.distill, lowrank_ext.cli; "
                         "print(sorted(m for m in sys.modules if m.startswith("
                         "('torch._dynamo', 'torch._inductor'))))"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_backend_info_keys_and_types():
    info = lx.backend_info()
    for key in ("compiled", "cpu", "cuda"):
        assert isinstance(info[key], bool)
    assert info["version"] == lx.__version__
    assert isinstance(info["torch"], str)
    assert (info["fallback_reason"] is None) == info["compiled"]
    if info["cpu"]:
        assert info["cpu_kernels"] == torch.ops.lowrank_ext._cpu_kernel("")
        assert info["cpu_kernels"] in ("avx512bf16", "avx2", "portable")
        assert set(info["cpu_widened_half"]) <= {"float16", "bfloat16"}
    else:
        assert info["cpu_kernels"] is None and info["cpu_widened_half"] is None


def test_cpu_widened_half_follows_the_switch(monkeypatch):
    if not lx.backend_info()["cpu"]:
        pytest.skip("needs the compiled CPU kernels")
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", "1")
    assert lx.backend_info()["cpu_widened_half"] == ["float16", "bfloat16"]
    monkeypatch.setenv("LOWRANK_EXT_WIDEN_HALF", "0")
    assert lx.backend_info()["cpu_widened_half"] == []
    assert torch.ops.lowrank_ext._cpu_widen_half(torch.float32) is False


def test_forced_fallback_is_reported_and_works():
    code = ("import torch, lowrank_ext as lx; i = lx.backend_info(); "
            "assert not i['compiled'] and not i['cpu'] and i['cpu_kernels'] is None and i['cpu_prefault'] is None, i; print(i['fallback_reason']); "
            "x, A, B = torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 2); "
            "torch.testing.assert_close(lx.lowrank_linear(x, A, B), x @ (B @ A).T)")
    out = _run(["-c", code], {"LOWRANK_EXT_FORCE_FALLBACK": "1"})
    assert out.returncode == 0, out.stderr
    assert "LOWRANK_EXT_FORCE_FALLBACK=1" in out.stdout


def test_cli_info_and_demo():
    info = _run(["-m", "lowrank_ext", "info"])
    assert info.returncode == 0, info.stderr
    assert "compiled" in info.stdout and "fallback_reason" in info.stdout
    demo = _run(["-m", "lowrank_ext", "demo"])
    assert demo.returncode == 0, demo.stderr
    for text in ("rank of W: 2", "B (10, 2), A (2, 10)", "W: 100   B and A: 40", "equal"):
        assert text in demo.stdout
    backend = "compiled C++ kernels" if lx.backend_info()["cpu"] else "pure-torch fallback"
    assert backend in demo.stdout


def test_cli_reports_a_bad_argument_in_one_line():
    out = _run(["-m", "lowrank_ext", "demo", "--rank", "0"])
    assert out.returncode != 0
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--rank", "20"], "--rank must be in [1, --size] = [1, 10], got 20"),
    (["--size", "0"], "--size must be in [1, 4096], got 0"),
])
def test_demo_refuses_impossible_sizes(argv, message, capsys):
    from lowrank_ext import cli

    assert cli.main(["demo", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_demo_compares_relative_to_the_values(capsys):
    from lowrank_ext import cli

    # A 300 × 300 rank-20 W: outputs in the tens, float32 rounding above 1e-5.
    assert cli.main(["demo", "--size", "300", "--rank", "20"]) == 0
    assert "equal up to float32 rounding" in capsys.readouterr().out


def test_a_reader_that_goes_away_is_no_error(capsys, monkeypatch):
    # `python -m lowrank_ext demo | head -1`: the write fails with EPIPE.
    from lowrank_ext import cli, demo

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(demo, "run", closed_pipe)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == ""


def test_backend_info_does_not_guess_the_build_without_the_extension():
    code = "import lowrank_ext as lx; print(lx.backend_info()['cuda_built'])"
    out = _run(["-c", code], {"LOWRANK_EXT_FORCE_FALLBACK": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr


@pytest.mark.slow
def test_pure_python_install_without_the_build(tmp_path):
    """LOWRANK_EXT_BUILD=0 installs a package that runs on the pure-torch kernels."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for name in files.stdout.split():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    target = tmp_path / "site"
    out = _run(["-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                "--target", str(target), str(src)], {"LOWRANK_EXT_BUILD": "0"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert not list(target.glob("lowrank_ext/_C*.so"))
    code = ("import lowrank_ext as lx; i = lx.backend_info(); assert not i['compiled'], i; "
            "print(i['fallback_reason'])")
    plain = {"PYTHONPATH": str(target), "LOWRANK_EXT_FORCE_FALLBACK": ""}
    out = _run(["-c", code], plain, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout
    demo = _run(["-m", "lowrank_ext", "demo"], plain, cwd=tmp_path)
    assert demo.returncode == 0 and "pure-torch fallback" in demo.stdout, demo.stderr


@pytest.mark.parametrize("name, value", [("LOWRANK_EXT_CPU_KERNEL", "AVX2"),
                                         ("LOWRANK_EXT_WIDEN_HALF", "yes"),
                                         ("LOWRANK_EXT_FORCE_FALLBACK", "maybe")])
def test_a_misspelt_setting_is_named_not_ignored_silently(name, value):
    out = _run(["-c", "import lowrank_ext"], {name: value})
    assert out.returncode == 0
    assert f"{name}={value!r} is not one of" in out.stderr


def test_a_build_that_does_not_load_is_a_warning_with_the_way_out(tmp_path):
    # A _C built for another torch failed to load without a word (the reason
    # was logged at INFO), and every op ran on the slower fallback.
    package = tmp_path / "lowrank_ext"
    shutil.copytree(ROOT / "lowrank_ext", package,
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    (package / "_C.so").write_bytes(b"not a shared library")
    out = _run(["-c", "import lowrank_ext as lx; print(lx.backend_info()['compiled'])"],
               {"PYTHONPATH": str(tmp_path), "LOWRANK_EXT_FORCE_FALLBACK": ""}, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    assert "lowrank_ext._C failed to load" in out.stderr
    assert "--no-build-isolation --no-cache-dir --force-reinstall --no-deps" in out.stderr
    # No build at all (LOWRANK_EXT_BUILD=0) is a choice: nothing is printed.
    (package / "_C.so").unlink()
    out = _run(["-c", "import lowrank_ext"], {"PYTHONPATH": str(tmp_path),
                                             "LOWRANK_EXT_FORCE_FALLBACK": ""}, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
