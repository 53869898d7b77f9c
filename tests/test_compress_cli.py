"""``python -m lowrank_ext compress`` and ``spectrum`` on small safetensors files."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from torch import nn

import lowrank_ext as lx
from lowrank_ext.cli import main


def build():
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))


@pytest.fixture
def weights(tmp_path):
    model = build()
    path = tmp_path / "in.safetensors"
    save_model(model, str(path))
    return model, path


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_compress_ratio_writes_factors_loadable_into_the_model(weights, tmp_path, capsys):
    model, path = weights
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(path), "-o", str(out), "--ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "wrote" in text
    tensors, meta = _read(out)
    r0, r2 = math.floor(0.5 * 600 / 50), math.floor(0.5 * 300 / 40)
    assert json.loads(meta["lowrank_ext"])["ranks"] == {"0": r0, "2": r2}
    assert set(tensors) == {"0.A", "0.B", "0.bias", "2.A", "2.B", "2.bias"}
    U, S, Vh = torch.linalg.svd(model[0].weight.detach().double())
    torch.testing.assert_close((tensors["0.B"].double() @ tensors["0.A"].double()),
                               U[:, :r0] @ torch.diag(S[:r0]) @ Vh[:r0], rtol=1e-5, atol=1e-5)
    fresh = lx.load_compressed(build(), out)
    assert fresh[0].rank == r0 and fresh[2].rank == r2
    torch.testing.assert_close(fresh[0].bias, model[0].bias)


def test_compress_rank_include_and_json(weights, tmp_path, capsys):
    _, path = weights
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(path), "-o", str(out), "--rank", "3", "--include", "2",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [l["name"] for l in report["layers"]] == ["2"]
    assert report["layers"][0]["rank"] == 3
    tensors, _ = _read(out)
    assert "0.weight" in tensors and "2.A" in tensors and "2.weight" not in tensors


def test_compress_energy_and_dense_layers(weights, tmp_path, capsys):
    model, path = weights
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(path), "-o", str(out), "--energy", "1.0"]) == 0
    assert "saves nothing" in capsys.readouterr().out
    tensors, meta = _read(out)
    assert json.loads(meta["lowrank_ext"])["ranks"] == {}
    torch.testing.assert_close(tensors["0.weight"], model[0].weight.detach())


def test_compress_refuses_to_overwrite_without_force(weights, tmp_path, capsys):
    _, path = weights
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    assert main(["compress", str(path), "-o", str(out), "--rank", "2"]) == 1
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["compress", str(path), "-o", str(out), "--rank", "2", "--force"]) == 0
    assert "0.A" in _read(out)[0]


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "0"], "--ratio must be in (0, 1], got 0.0"),
    (["--ratio", "1.5"], "--ratio must be in (0, 1], got 1.5"),
    (["--rank", "0"], "--rank must be >= 1"),
    (["--energy", "2"], "--energy must be in (0, 1]"),
    (["--rank", "2", "--include", "nothing*"], "include pattern 'nothing*' matches no 2-D weight"),
    (["--rank", "2", "--include", "0", "--exclude", "0"],
     "include/exclude leave no 2-D weight selected"),
    (["--rank", "6", "--rank-multiple", "4"], "--rank 6 is not a multiple of --rank-multiple 4"),
    (["--ratio", "0.5", "--rank-multiple", "0"], "--rank-multiple must be >= 1"),
    (["--ratio", "0.1", "--rank-multiple", "4"],
     "--ratio 0.1 gives layer '0' (30×20) rank 1, less than one block of --rank-multiple 4; "
     "raise the ratio, lower --rank-multiple or exclude the layer"),
    (["--ratio", "1", "--rank-multiple", "8"],
     "layer '2' (10×30) cannot be factorized in blocks of 8 ranks: d·k/(d+k) = 7.5 saves "
     "nothing beyond that; use a smaller --rank-multiple or exclude the layer"),
])
def test_compress_bad_arguments(weights, tmp_path, capsys, extra, message):
    _, path = weights
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(path), "-o", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    # The error line names the command once, the message after it nothing more.
    assert err.startswith("lowrank_ext compress: error: ") and err.count("compress") == 1
    assert "None" not in err
    assert not out.exists()


def test_compress_rank_multiple_rounds_the_ranks(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.ReLU(), nn.Linear(60, 50))
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_model(model, str(path))
    assert main(["compress", str(path), "-o", str(out), "--ratio", "0.5",
                 "--rank-multiple", "8", "--force"]) == 0
    tensors, _ = _read(out)
    # ⌊0.5·60·40/100⌋ = 12 → 8 and ⌊0.5·50·60/110⌋ = 13 → 8
    assert tensors["0.A"].shape == (8, 40) and tensors["2.A"].shape == (8, 60)
    assert main(["compress", str(path), "-o", str(out), "--energy", "0.5",
                 "--rank-multiple", "8", "--force"]) == 0
    for key, layer in (("0", model[0]), ("2", model[2])):
        S = torch.linalg.svdvals(layer.weight.detach().double())
        expected = -(-lx.choose_rank(S, energy=0.5) // 8) * 8
        assert _read(out)[0][f"{key}.A"].shape[0] == expected


def test_compress_bad_files(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(tmp_path / "absent.safetensors"), "-o", str(out),
                 "--rank", "2"]) == 1
    assert "no such file" in capsys.readouterr().err
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    assert main(["compress", str(garbage), "-o", str(out), "--rank", "2"]) == 1
    assert "cannot read" in capsys.readouterr().err
    only_1d = tmp_path / "vec.safetensors"
    save_file({"v": torch.zeros(4)}, str(only_1d))
    assert main(["compress", str(only_1d), "-o", str(out), "--rank", "2"]) == 1
    assert "no 2-D floating-point tensor" in capsys.readouterr().err
    assert not out.exists()
    # spectrum's listing printed an empty table and succeeded.
    ints = tmp_path / "ints.safetensors"
    save_file({"v": torch.zeros(4), "i": torch.zeros(3, 3, dtype=torch.int32),
               "e": torch.zeros(0, 3)}, str(ints))
    for path in (only_1d, ints):
        assert main(["spectrum", str(path)]) == 1
        captured = capsys.readouterr()
        assert "no 2-D floating-point tensor" in captured.err and not captured.out


def test_spectrum_text_and_listing(weights, capsys):
    model, path = weights
    assert main(["spectrum", str(path), "--layer", "0"]) == 0
    text = capsys.readouterr().out
    S = torch.linalg.svdvals(model[0].weight.detach().double())
    assert "0.weight: shape 30x20" in text
    assert f"rank for 90.0% energy: {lx.choose_rank(S, energy=0.9)}" in text
    assert main(["spectrum", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "0.weight" in listing and "2.weight" in listing


def test_spectrum_plot(weights, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, path = weights
    png = tmp_path / "s.png"
    assert main(["spectrum", str(path), "--layer", "2.weight", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["spectrum", str(path), "--layer", "2", "--plot", str(png)]) == 1
    assert "--force" in capsys.readouterr().err


def test_spectrum_without_matplotlib(weights, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    _, path = weights
    png = tmp_path / "s.png"
    assert main(["spectrum", str(path), "--layer", "0", "--plot", str(png)]) == 1
    assert "pip install lowrank_ext[plot]" in capsys.readouterr().err
    assert not png.exists()


def test_spectrum_unknown_layer(weights, capsys):
    _, path = weights
    assert main(["spectrum", str(path), "--layer", "nope"]) == 1
    assert "no tensor 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["not-safetensors", "truncated"])
def test_spectrum_listing_of_a_bad_file_prints_only_the_error(weights, tmp_path, capsys,
                                                              damage):
    # The table's header went to stdout before the file was opened.
    _, path = weights
    bad = tmp_path / "bad.safetensors"
    data = path.read_bytes()
    bad.write_bytes(b"not a safetensors file" if damage == "not-safetensors"
                    else data[:len(data) // 2])
    assert main(["spectrum", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, (out, err)


# --- bad input: one line on stderr, exit status 1, nothing half-written ---------------
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a non-UTF-8 file name")
@pytest.mark.parametrize("command", ["compress", "spectrum"])
def test_an_input_name_that_is_not_utf8_is_named_as_such(weights, tmp_path, capsys, command):
    # safetensors cannot open it and called the file "not a valid safetensors file".
    model, path = weights
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/w\xff.safetensors")
    os.link(path, os.fsencode(odd))
    argv = ([command, odd, "-o", str(tmp_path / "out.safetensors"), "--rank", "2"]
            if command == "compress" else [command, odd])
    assert main(argv) == 1
    line = _one_error_line(capsys, command)
    assert "safetensors opens only files whose path is valid UTF-8" in line
    assert "w\\xff.safetensors" in line and not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ValueError, match="load_compressed: cannot read .*valid UTF-8"):
        lx.load_compressed(build(), odd)


def _one_error_line(capsys, command):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lowrank_ext {command}: error: ")
    return lines[0]


def test_a_tensor_torch_cannot_hold_is_one_error_line(tmp_path, capsys):
    # An F6_E2M3 tensor (in the safetensors format, with no torch dtype) gave
    # safetensors' own traceback.
    torch.manual_seed(0)
    weight = torch.randn(8, 6)
    header = {"w.weight": {"dtype": "F32", "shape": [8, 6], "data_offsets": [0, 192]},
              "q.weight": {"dtype": "F6_E2M3", "shape": [8, 8], "data_offsets": [192, 240]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "f6.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + weight.numpy().tobytes()
                     + bytes(48))
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(path), "-o", str(out), "--rank", "2"]) == 1
    assert f"cannot read tensor 'q.weight' of {path}: " in _one_error_line(capsys, "compress")
    assert not out.exists()
    assert main(["spectrum", str(path), "--layer", "q"]) == 1
    assert "cannot read tensor 'q.weight'" in _one_error_line(capsys, "spectrum")
    # The listing shows the others and says which it cannot read.
    assert main(["spectrum", str(path)]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["q.weight"] == ["8x8", "cannot", "read", "F6_E2M3"]
    assert rows["w.weight"][0] == "8x6" and rows["w.weight"][-1] == "6"


def test_weights_whose_largest_singular_value_is_past_float64(tmp_path, capsys):
    """A finite float64 weight with σ₁ above float64's largest value: ranks come from
    its singular values scaled by a power of two (svdvals gave inf, and "S must be
    finite"); factors that cannot hold σ₁ are the CLI's error, naming the weight."""
    torch.manual_seed(0)
    W = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64)
    W = W / W.abs().max() * 1.5e308
    path = tmp_path / "huge.safetensors"
    save_file({"h.weight": W}, str(path))
    assert main(["spectrum", str(path), "--layer", "h"]) == 0
    out = capsys.readouterr().out
    assert "σ_1 = inf" in out and "rank for 99.0% energy: 3" in out
    assert main(["spectrum", str(path)]) == 0
    assert capsys.readouterr().out.split("\n")[1].split()[-2:] == ["3", "3"]
    assert main(["compress", str(path), "-o", str(tmp_path / "out.safetensors"),
                 "--energy", "0.99"]) == 1
    line = _one_error_line(capsys, "compress")
    assert "rank-3 factors of weight 'h.weight'" in line and "exceed the range of float64" in line
    assert not (tmp_path / "out.safetensors").exists()


def _cut(data, where):
    header_len = int.from_bytes(data[:8], "little")
    return {"data": data[:(len(data) + 8 + header_len) // 2],
            "header": data[:8 + header_len // 2]}[where]


@pytest.mark.parametrize("where, message", [
    ("data", "the file is truncated: its tensors end at byte"),
    ("header", "the file is truncated: its header is"),
])
@pytest.mark.parametrize("command", [
    ["compress", "{IN}", "-o", "{OUT}", "--rank", "2"],
    ["spectrum", "{IN}"],
    ["spectrum", "{IN}", "--layer", "0"],
], ids=["compress", "spectrum", "spectrum-layer"])
def test_truncated_input(weights, tmp_path, capsys, where, message, command):
    _, path = weights
    short = tmp_path / "short.safetensors"
    short.write_bytes(_cut(path.read_bytes(), where))
    out = tmp_path / "out.safetensors"
    argv = [a.replace("{IN}", str(short)).replace("{OUT}", str(out)) for a in command]
    assert main(argv) == 1
    line = _one_error_line(capsys, command[0])
    assert f"cannot read {short} as safetensors: {message}" in line
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "short.safetensors"]


@pytest.mark.parametrize("error, status", [(OSError("disk full"), 1), (KeyboardInterrupt(), 130)])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_output_and_no_temporary_file(weights, tmp_path, capsys,
                                                              monkeypatch, error, status,
                                                              existing):
    _, path = weights
    out = tmp_path / "out.safetensors"
    if existing:
        out.write_bytes(b"the previous output")

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise error

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    assert main(["compress", str(path), "-o", str(out), "--rank", "2", "--force"]) == status
    if status == 1:
        assert "disk full" in _one_error_line(capsys, "compress")
    if existing:
        assert out.read_bytes() == b"the previous output"
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"] + (["out.safetensors"] * existing)


def test_terminated_write_leaves_no_temporary_file(weights, tmp_path, capsys, monkeypatch):
    # SIGTERM (kill, timeout) killed the command mid-write and left the
    # temporary files beside the output; it now cleans up as Ctrl-C does.
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner here")
    _, path = weights
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous output")

    def terminated_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; this is never finished

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", terminated_save)
    assert main(["compress", str(path), "-o", str(out), "--rank", "2", "--force"]) == 143
    assert capsys.readouterr().err.strip() == "lowrank_ext compress: terminated"
    assert out.read_bytes() == b"the previous output"
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "out.safetensors"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_output_paths_that_cannot_be_written(weights, tmp_path, capsys):
    _, path = weights
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    for force in ([], ["--force"]):
        assert main(["compress", str(path), "-o", str(outdir), "--rank", "2", *force]) == 1
        assert f"{outdir} is a directory; give a file name" in _one_error_line(capsys, "compress")
    nowhere = tmp_path / "missing" / "out.safetensors"
    assert main(["compress", str(path), "-o", str(nowhere), "--rank", "2"]) == 1
    line = _one_error_line(capsys, "compress")
    assert f"cannot write {nowhere}: no directory {nowhere.parent}" in line
    assert main(["compress", str(tmp_path), "-o", str(tmp_path / "o.safetensors"),
                 "--rank", "2"]) == 1
    assert (f"{tmp_path} is a directory with neither model.safetensors nor "
            "model.safetensors.index.json") in _one_error_line(capsys, "compress")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "outdir"]
    assert os.listdir(outdir) == []


def test_non_finite_weights_are_named(tmp_path, capsys):
    path = tmp_path / "nan.safetensors"
    save_file({"fc.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
               "ok.weight": torch.eye(3)}, str(path))
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(path), "-o", str(out), "--rank", "1"]) == 1
    assert f"weight 'fc.weight' in {path} has NaN or Inf" in _one_error_line(capsys, "compress")
    assert not out.exists()
    assert main(["spectrum", str(path), "--layer", "fc"]) == 1
    assert f"tensor 'fc.weight' in {path} has NaN or Inf" in _one_error_line(capsys, "spectrum")
    assert main(["spectrum", str(path)]) == 0  # the listing marks it and goes on
    listing = capsys.readouterr().out
    assert "has NaN or Inf" in listing and "ok.weight" in listing


def test_spectrum_unknown_layer_message_has_no_stray_quotes(weights, capsys):
    _, path = weights
    assert main(["spectrum", str(path), "--layer", "nope"]) == 1
    line = _one_error_line(capsys, "spectrum")
    assert line == (f"lowrank_ext spectrum: error: no tensor 'nope' (nor 'nope.weight') in "
                    f"{path} (2-D tensors: 0.weight, 2.weight)")


def test_spectrum_plot_failures_leave_no_file(weights, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    _, path = weights
    # An unknown image format is refused before any work is done.
    assert main(["spectrum", str(path), "--layer", "0", "--plot",
                 str(tmp_path / "s.xyz")]) == 1
    assert "matplotlib cannot write 'xyz' images" in _one_error_line(capsys, "spectrum")
    assert capsys.readouterr().out == ""
    nowhere = tmp_path / "missing" / "s.png"
    assert main(["spectrum", str(path), "--layer", "0", "--plot", str(nowhere)]) == 1
    assert f"no directory {nowhere.parent}" in _one_error_line(capsys, "spectrum")

    from matplotlib.figure import Figure

    real_savefig = Figure.savefig

    def broken_savefig(self, fname, **kwargs):
        if not isinstance(fname, (str, os.PathLike)):
            return real_savefig(self, fname, **kwargs)  # the format check before the work
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.EFBIG, "File too large")  # as a file-size limit gives it

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    assert main(["spectrum", str(path), "--layer", "0", "--plot", str(tmp_path / "s.png")]) == 1
    # The plot's path is named (the error named no file).
    assert f"cannot write {tmp_path / 's.png'}: File too large" in \
        _one_error_line(capsys, "spectrum")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_traceback_flag_before_or_after_the_command(weights, tmp_path):
    _, path = weights
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    out = str(tmp_path / "out.safetensors")
    for argv in (["--traceback", "compress", str(garbage), "-o", out, "--rank", "2"],
                 ["compress", str(garbage), "-o", out, "--rank", "2", "--traceback"]):
        with pytest.raises(ValueError, match="it is not a safetensors file"):
            main(argv)


def test_command_line_exit_status_and_one_line_without_traceback(weights, tmp_path):
    _, path = weights
    short = tmp_path / "short.safetensors"
    short.write_bytes(_cut(path.read_bytes(), "data"))
    out = tmp_path / "out.safetensors"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "lowrank_ext", "compress", str(short), "-o", str(out),
            "--rank", "2"]
    # Both at once: each spends most of its time importing torch.
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
            for args in (argv, argv + ["--traceback"])]
    try:
        (plain_out, plain_err), (tb_out, tb_err) = (p.communicate(timeout=120) for p in runs)
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    plain, with_traceback = runs
    assert plain.returncode == 1
    assert plain_err.strip().splitlines() == [
        f"lowrank_ext compress: error: cannot read {short} as safetensors: the file is "
        f"truncated: its tensors end at byte {path.stat().st_size} but the file has "
        f"{short.stat().st_size} bytes"]
    assert "Traceback" not in plain_err and plain_out == ""
    assert with_traceback.returncode != 0
    assert "Traceback (most recent call last)" in tb_err
    assert "ValueError: cannot read" in tb_err
    assert not out.exists()


def _truncated(W, rank):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def test_conv1d_weights_stored_transposed_load_into_the_original_layers(tmp_path, capsys):
    """transformers' Conv1D stores (in, out); the factors must be turned around on
    loading, also where a square weight's shape cannot tell."""
    T = pytest.importorskip("transformers")
    Conv1D = T.pytorch_utils.Conv1D

    def conv_model():
        # Conv1D(out, in): 16 -> 24 -> 24 (square) -> 16
        return nn.Sequential(Conv1D(24, 16), nn.ReLU(), Conv1D(24, 24), nn.ReLU(),
                             Conv1D(16, 24)).double()

    torch.manual_seed(0)
    model = conv_model()
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_model(model, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "3"]) == 0
    capsys.readouterr()
    fresh = lx.load_compressed(conv_model(), out)
    x = torch.randn(5, 16, dtype=torch.float64)
    h = x
    for layer in (model[0], model[2], model[4]):  # Conv1D: y = x·W + b, W (in, out)
        h = h @ _truncated(layer.weight.detach(), 3) + layer.bias.detach()
        if layer is not model[4]:
            h = torch.relu(h)
    torch.testing.assert_close(fresh(x), h, rtol=1e-10, atol=1e-10)


class _EmbedAndTiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(40, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed_tokens.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed_tokens(ids))))


def test_embedding_tables_and_tied_weights_stay_so_the_output_loads(tmp_path, capsys):
    torch.manual_seed(0)
    model = _EmbedAndTiedHead()
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_model(model, str(path))  # the tied table is stored once, under one of the names
    assert main(["compress", str(path), "-o", str(out), "--rank", "2", "--json"]) == 0
    notes = {l["name"]: l["note"] for l in json.loads(capsys.readouterr().out)["layers"]}
    assert json.loads(_read(out)[1]["lowrank_ext"])["ranks"] == {"body": 2}
    tied = "head" if "head" in notes else "embed_tokens"  # whichever name holds the table
    assert "(tied)" in notes[tied] and "embed_tokens" in notes[tied] + tied
    fresh = lx.load_compressed(_EmbedAndTiedHead(), out)
    assert torch.equal(fresh.head.weight, model.head.weight)
    ids = torch.randint(0, 40, (3, 4))
    W = _truncated(model.body.weight.detach(), 2)
    h = torch.relu(model.embed_tokens(ids).double() @ W.T + model.body.bias.double())
    torch.testing.assert_close(fresh(ids).double(), h @ model.head.weight.double().T,
                               rtol=1e-5, atol=1e-5)


def test_embedding_tables_and_bare_parameters_are_kept_unless_asked(tmp_path, capsys):
    torch.manual_seed(0)
    tables = {"embeddings.word_embeddings.weight": torch.randn(50, 12),
              "transformer.wte.weight": torch.randn(50, 12),
              "text_projection": torch.randn(12, 12),  # a bare nn.Parameter, no layer
              "fc.weight": torch.randn(12, 12)}
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tables, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "2"]) == 0
    text = capsys.readouterr().out
    for name, why in (("embeddings.word_embeddings", "named like an embedding table"),
                      ("transformer.wte", "named like an embedding table"),
                      ("text_projection", "not a layer's .weight")):
        assert f"{name}: dense: {why}, which load_compressed cannot put" in text
    tensors, meta = _read(out)
    assert json.loads(meta["lowrank_ext"])["ranks"] == {"fc": 2}
    assert torch.equal(tensors["text_projection"], tables["text_projection"])
    assert main(["compress", str(path), "-o", str(out), "--rank", "2", "--all-tensors",
                 "--force"]) == 0
    tensors, meta = _read(out)
    assert json.loads(meta["lowrank_ext"])["ranks"] == {
        "embeddings.word_embeddings": 2, "transformer.wte": 2, "text_projection": 2, "fc": 2}
    assert {"text_projection.A", "text_projection.B"} <= set(tensors)


def test_a_sharded_checkpoint_directory_is_read_as_one_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = build()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    weight_map = {}
    for i, keys in enumerate((["0.weight", "0.bias"], ["2.weight", "2.bias"])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out.safetensors"
    for source in (folder, folder / "model.safetensors.index.json"):
        assert main(["compress", str(source), "-o", str(out), "--rank", "3", "--force"]) == 0
        capsys.readouterr()
        fresh = lx.load_compressed(build(), out)
        for i in (0, 2):
            torch.testing.assert_close(fresh[i].B.double() @ fresh[i].A.double(),
                                       _truncated(model[i].weight.detach(), 3),
                                       rtol=1e-5, atol=1e-6)
    assert main(["spectrum", str(folder), "--layer", "2"]) == 0
    assert "2.weight: shape 10x30" in capsys.readouterr().out
    assert main(["spectrum", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert "0.weight" in listing and "2.weight" in listing
    os.remove(folder / "model-00002-of-00002.safetensors")
    assert main(["compress", str(folder), "-o", str(out), "--rank", "3", "--force"]) == 1
    assert "no such file" in _one_error_line(capsys, "compress")


def test_compressing_a_compressed_file_again_keeps_the_earlier_layers(weights, tmp_path, capsys):
    model, path = weights
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    assert main(["compress", str(path), "-o", str(once), "--rank", "4", "--include", "0"]) == 0
    assert main(["compress", str(once), "-o", str(twice), "--rank", "3", "--include", "2",
                 "--json"]) == 0
    capsys.readouterr()
    tensors, meta = _read(twice)
    assert json.loads(meta["lowrank_ext"])["ranks"] == {"0": 4, "2": 3}
    assert set(tensors) == {"0.A", "0.B", "0.bias", "2.A", "2.B", "2.bias"}
    fresh = lx.load_compressed(build(), twice)
    assert (fresh[0].rank, fresh[2].rank) == (4, 3)
    torch.testing.assert_close(fresh[0].B.double() @ fresh[0].A.double(),
                               _truncated(model[0].weight.detach(), 4), rtol=1e-5, atol=1e-5)
    # Nothing left to factorize at all: said so.
    again = tmp_path / "again.safetensors"
    assert main(["compress", str(twice), "-o", str(again), "--rank", "3"]) == 1
    assert "its layers 0, 2 are factorized already" in capsys.readouterr().err
    assert not again.exists()


def test_factors_already_in_the_input_are_reported_and_kept(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(),
                          nn.Linear(10, 12))
    path, once, twice = (tmp_path / f"{n}.safetensors" for n in ("in", "once", "twice"))
    save_model(model, str(path))
    assert main(["compress", str(path), "-o", str(once), "--rank", "4", "--include", "0"]) == 0
    capsys.readouterr()
    assert main(["compress", str(once), "-o", str(twice), "--rank", "3", "--exclude", "2",
                 "--json"]) == 0
    layers = {l["name"]: l for l in json.loads(capsys.readouterr().out)["layers"]}
    assert layers["0"]["rank"] == 4 and layers["0"]["weight_error"] is None
    assert "factorized already" in layers["0"]["note"] and layers["4"]["rank"] == 3
    assert json.loads(_read(twice)[1]["lowrank_ext"])["ranks"] == {"0": 4, "4": 3}
    lx.load_compressed(model, twice)
    assert (model[0].rank, model[4].rank) == (4, 3)
    # The table shows the kept layer's rank, with no weight error to give.
    assert main(["compress", str(once), "-o", str(twice), "--rank", "3", "--exclude", "2",
                 "--force"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("0 "))
    assert row.split()[1:3] == ["30x20", "4"] and row.split()[-1] == "-"


def test_a_layer_registered_under_two_names_is_read_through_its_alias(tmp_path, capsys):
    # save_compressed stores a shared module's factors once; the second name
    # is an alias in the metadata (the file was refused as missing b.A, b.B).
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = lx.LowRankLinear(16, 32, 3)
            self.b = self.a
            self.wte = nn.Embedding(10, 16)  # something for the command to read

    torch.manual_seed(0)
    model = Shared()
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    lx.save_compressed(model, path)
    assert main(["compress", str(path), "-o", str(out), "--rank", "2", "--json"]) == 0
    layers = {l["name"]: l for l in json.loads(capsys.readouterr().out)["layers"]}
    assert (layers["a"]["rank"], layers["b"]["rank"], layers["wte"]["rank"]) == (3, 3, None)
    assert layers["a"]["params_after"] == 3 * 48 and layers["b"]["params_after"] == 0
    assert "the same factors as a" in layers["b"]["note"]
    fresh = Shared()
    lx.load_compressed(fresh, out)
    assert fresh.a is fresh.b and torch.equal(fresh.wte.weight, model.wte.weight)
    assert torch.equal(fresh.a.A, model.a.A) and torch.equal(fresh.a.B, model.a.B)


def test_a_save_compressed_file_cannot_take_factors_of_another_layout(weights, tmp_path, capsys):
    model, _ = weights
    lx.compress_model(model, rank=4, include="0")
    path, out = tmp_path / "saved.safetensors", tmp_path / "out.safetensors"
    lx.save_compressed(model, path)
    assert main(["compress", str(path), "-o", str(out), "--rank", "3"]) == 1
    err = capsys.readouterr().err
    assert "holds layers factorized by save_compressed" in err and not out.exists()
    # With nothing new to factorize (layer 2, 10×30, breaks even at rank 7.5)
    # its layers and their layout stay as they are.
    assert main(["compress", str(path), "-o", str(out), "--rank", "8"]) == 0
    assert _read(out)[1]["lowrank_ext"] == _read(path)[1]["lowrank_ext"]
    lx.load_compressed(build(), out)


def _encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


def test_the_out_proj_of_packed_attention_stays_dense_so_the_output_loads(tmp_path, capsys):
    torch.manual_seed(0)
    model = _encoder().eval()
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_model(model, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "4"]) == 0
    text = capsys.readouterr().out
    assert "layers.0.self_attn.out_proj: dense: the out_proj of an nn.MultiheadAttention" in text
    assert json.loads(_read(out)[1]["lowrank_ext"])["ranks"] == {
        "layers.0.linear1": 4, "layers.0.linear2": 4}
    fresh = lx.load_compressed(_encoder().eval(), out)
    assert type(fresh.layers[0].self_attn.out_proj) is not lx.LowRankLinear
    x = torch.randn(2, 5, 16)
    assert torch.equal(fresh.layers[0].self_attn.out_proj.weight,
                       model.layers[0].self_attn.out_proj.weight)
    fresh(x)


def test_float8_weights_stay_dense_and_spectrum_reads_them(tmp_path, capsys):
    torch.manual_seed(0)
    tables = {"q.weight": torch.randn(24, 16).to(torch.float8_e4m3fn),
              "fc.weight": torch.randn(24, 16)}
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tables, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "2"]) == 0
    assert "q: dense: float8_e4m3fn, a quantized weight" in capsys.readouterr().out
    tensors, meta = _read(out)
    assert json.loads(meta["lowrank_ext"])["ranks"] == {"fc": 2}
    assert torch.equal(tensors["q.weight"].view(torch.uint8), tables["q.weight"].view(torch.uint8))
    assert main(["spectrum", str(path)]) == 0
    assert "q.weight" in capsys.readouterr().out
    assert main(["spectrum", str(path), "--layer", "q"]) == 0
    S = torch.linalg.svdvals(tables["q.weight"].double())
    assert f"σ_1 = {float(S[0]):.4g}" in capsys.readouterr().out


def test_ratio_with_small_heads_keeps_going(tmp_path, capsys):
    # A 2-label head takes rank 1 (a few parameters over its share) and a
    # 1-output head stays dense: neither stops the command.
    torch.manual_seed(0)
    tables = {"body.weight": torch.randn(48, 32), "cls2.weight": torch.randn(2, 48),
              "cls1.weight": torch.randn(1, 48)}
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tables, str(path))
    assert main(["compress", str(path), "-o", str(out), "--ratio", "0.5", "--json"]) == 0
    layers = {l["name"]: l for l in json.loads(capsys.readouterr().out)["layers"]}
    assert layers["body"]["rank"] == math.floor(0.5 * 48 * 32 / 80)
    assert layers["cls2"]["rank"] == 1 and layers["cls1"]["rank"] is None


@pytest.mark.parametrize("output, message", [
    ("", "--output is empty; give a file name"),
    ("nodir/", "--output 'nodir/' names a directory, not a file; give a file name"),
    ("nodir/.", "--output 'nodir/.' names a directory, not a file; give a file name"),
])
def test_an_output_naming_no_file_is_refused_writing_nothing(weights, tmp_path, capsys,
                                                             monkeypatch, output, message):
    _, path = weights
    (tmp_path / "inner").mkdir()
    monkeypatch.chdir(tmp_path / "inner")
    assert main(["compress", str(path), "-o", output, "--rank", "2"]) == 1
    assert _one_error_line(capsys, "compress") == f"lowrank_ext compress: error: {message}"
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "inner"]
    assert os.listdir(tmp_path / "inner") == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reported_errors_are_those_of_the_factors_written(tmp_path, capsys, dtype):
    """The factors are written in the weight's dtype; bfloat16's rounding outweighs this
    truncation, and where it alone misses --energy the layer's note says so."""
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(64, 6, generator=g, dtype=torch.float64)
         @ torch.randn(6, 96, generator=g, dtype=torch.float64)
         + 1e-3 * torch.randn(64, 96, generator=g, dtype=torch.float64)).to(dtype)
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"fc.weight": W}, str(path))
    energy = 1 - 0.002 ** 2
    assert main(["compress", str(path), "-o", str(out), "--energy", str(energy),
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["layers"][0]
    assert row["rank"] == 6
    tensors, _ = _read(out)
    assert tensors["fc.A"].dtype == tensors["fc.B"].dtype == dtype
    W = W.double()
    error = float((W - tensors["fc.B"].double() @ tensors["fc.A"].double()).norm() / W.norm())
    assert row["weight_error"] == pytest.approx(error, rel=1e-6)
    if 1 - error ** 2 < energy:
        assert dtype == torch.bfloat16
        assert "rounding the factors to bfloat16" in row["note"]
        assert f"below energy={energy}" in row["note"]
    else:
        assert row["note"] == ""
    if dtype == torch.bfloat16:
        assert row["note"]


def test_spectrum_plot_energy_curve_of_weights_whose_squares_overflow(tmp_path, capsys,
                                                                      monkeypatch):
    # σ ≈ 1e200: S·S overflows to inf and the curve was all NaN, while the
    # ranks printed beside it were right.
    from lowrank_ext import spectrum_cli

    W = torch.randn(6, 6, dtype=torch.float64)
    path = tmp_path / "big.safetensors"
    save_file({"c.weight": W * 1e200}, str(path))
    drawn = {}
    monkeypatch.setattr(spectrum_cli, "load_matplotlib", lambda: None)
    monkeypatch.setattr(spectrum_cli, "_plot",
                        lambda out, name, S, energy: drawn.update(energy=energy))
    assert main(["spectrum", str(path), "--layer", "c", "--plot", str(tmp_path / "c.png")]) == 0
    s2 = torch.linalg.svdvals(W) ** 2
    torch.testing.assert_close(drawn["energy"], torch.cumsum(s2, 0) / s2.sum())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_spectrum_plot_into_a_directory_that_takes_no_file_fails_before_the_svd(weights,
                                                                               capsys):
    _, path = weights
    assert main(["spectrum", str(path), "--layer", "0", "--plot", "/proc/s.png"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("lowrank_ext spectrum: error: cannot write /proc/s.png: cannot "
                          "create a file in /proc") and err.count("\n") == 1
    assert out == ""  # nothing computed or printed first


def _two_layers():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(48, 64))
    model.add_module("b", nn.Linear(48, 64))
    return model


@pytest.mark.parametrize("extra", [[], ["--all-tensors"]])
def test_factor_pairs_of_a_state_dict_without_metadata_are_kept(tmp_path, capsys, extra):
    # safetensors' save_file of a compressed model's state_dict: no metadata,
    # but load_compressed reads b.A / b.B as a layer of rank 4. The command
    # took them for plain tensors (or, with --all-tensors, factorized them)
    # and wrote a file that no longer loaded.
    torch.manual_seed(0)
    model = _two_layers()
    lx.compress_model(model, rank=4, include=["b"], progress=False)
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    # a (64×48) breaks even at rank 27.4: nothing new to factorize.
    assert main(["compress", str(path), "-o", str(out), "--rank", "30", "--json",
                 *extra]) == 0
    layers = {l["name"]: l for l in json.loads(capsys.readouterr().out)["layers"]}
    assert set(layers) == {"a", "b"}
    assert layers["b"]["rank"] == 4 and "factorized already" in layers["b"]["note"]
    fresh = lx.load_compressed(_two_layers(), out)
    assert type(fresh.a) is nn.Linear and fresh.b.rank == 4
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # New factors of the stored tensors cannot join factors in nn.Linear
    # layout in one file (they differ for a transformers Conv1D): refused.
    out.unlink()
    assert main(["compress", str(path), "-o", str(out), "--rank", "4", *extra]) == 1
    line = _one_error_line(capsys, "compress")
    assert "holds layers factorized without lowrank_ext metadata" in line
    assert "(b), whose factors are in nn.Linear layout" in line and not out.exists()


def test_factors_past_the_range_of_float16_are_an_error(tmp_path, capsys):
    # Every entry of W fits float16, but B = U·diag(S) holds σ₁ ≈ 3000·√(64·1024).
    torch.manual_seed(0)
    W = (3000 + torch.randn(64, 1024)).half()
    assert bool(torch.isfinite(W).all())
    largest = float(torch.linalg.svdvals(W.double())[0])  # |B| <= σ₁
    assert largest > torch.finfo(torch.float16).max
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"fc.weight": W}, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "8"]) == 1
    line = _one_error_line(capsys, "compress")
    assert (f"the rank-8 factors of weight 'fc.weight' in {path} exceed the range of float16"
            in line and "compress a float32 copy of the file" in line)
    assert not out.exists()
    # What the message suggests works.
    save_file({"fc.weight": W.float()}, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "8"]) == 0
    assert all(bool(torch.isfinite(t).all()) for t in _read(out)[0].values())


def test_reported_error_of_weights_of_extreme_magnitude(tmp_path, capsys):
    # The squares summed in the norms overflowed (NaN) at 1e200 and
    # underflowed (0) at 1e-300; the relative error does not depend on the scale.
    torch.manual_seed(0)
    base = torch.randn(64, 48, dtype=torch.float64)
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"big.weight": base * 1e200, "plain.weight": base,
               "tiny.weight": base * 1e-300}, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "4", "--json"]) == 0
    layers = {l["name"]: l for l in json.loads(capsys.readouterr().out)["layers"]}
    S = torch.linalg.svdvals(base)
    expected = float((S[4:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt())
    for name in ("big", "plain", "tiny"):
        assert layers[name]["weight_error"] == pytest.approx(expected, rel=1e-9), name


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_an_output_that_is_no_regular_file_is_refused_and_kept(weights, tmp_path, capsys):
    # The file was written beside it and renamed onto it: a FIFO (or a
    # device like /dev/null) became a regular file.
    import stat

    _, path = weights
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv, option in ((["compress", str(path), "-o", str(fifo), "--rank", "2"], "--output"),
                         (["spectrum", str(path), "--layer", "0", "--plot", str(fifo)],
                          "--plot")):
        assert main(argv + ["--force"]) == 1
        line = _one_error_line(capsys, argv[0])
        assert line.endswith(f"error: {option} {fifo} is not a regular file (a device, FIFO or "
                             "socket), which writing would replace; give a file name")
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo", "in.safetensors"]
    # A symbolic link to a regular file is replaced by the output, its target kept.
    target, link = tmp_path / "target", tmp_path / "link.safetensors"
    target.write_bytes(b"keep me")
    link.symlink_to(target)
    assert main(["compress", str(path), "-o", str(link), "--rank", "2", "--force"]) == 0
    assert not link.is_symlink() and "0.A" in _read(link)[0]
    assert target.read_bytes() == b"keep me"


def _shards(folder, files, weight_map):
    """A sharded checkpoint: ``files`` {name: tensors}, and an index of ``weight_map``."""
    for name, tensors in files.items():
        save_file(tensors, str(folder / name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


@pytest.mark.parametrize("case", ["stray copy", "unlisted", "missing"])
def test_shards_must_hold_the_keys_their_index_maps_to_them(tmp_path, capsys, case):
    torch.manual_seed(0)
    right, stale = torch.randn(64, 48), torch.randn(64, 48)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    files = {"s1.safetensors": {"a.weight": right},
             "s2.safetensors": {"a.weight": stale, "x": torch.randn(3)}}
    weight_map = {"a.weight": "s1.safetensors", "x": "s2.safetensors"}
    message = (f"{folder / 's2.safetensors'} holds a.weight, which the weight_map of "
               f"{folder / 'model.safetensors.index.json'} does not put in that shard")
    if case == "unlisted":
        files["s2.safetensors"] = {"x": torch.randn(3), "y": torch.randn(3)}
        message = message.replace("a.weight", "y")
    elif case == "missing":
        files["s2.safetensors"] = {"x": torch.randn(3)}
        weight_map["b.weight"] = "./s2.safetensors"  # the same shard, named otherwise
        message = (f"{folder / 's2.safetensors'} lacks b.weight, which the weight_map of "
                   f"{folder / 'model.safetensors.index.json'} puts in that shard")
    index = _shards(folder, files, weight_map)
    out = tmp_path / "out.safetensors"
    for argv in (["compress", str(index), "-o", str(out), "--rank", "20"],
                 ["compress", str(folder), "-o", str(out), "--rank", "20"],
                 ["spectrum", str(index), "--layer", "a"],
                 ["spectrum", str(index)]):
        assert main(argv) == 1
        assert _one_error_line(capsys, argv[0]).endswith(f"error: {message}")
    assert not out.exists()
    # Consistent shards are read as one model, each key from its own shard.
    _shards(folder, {"s1.safetensors": {"a.weight": right},
                     "s2.safetensors": {"x": torch.randn(3)}},
            {"a.weight": "s1.safetensors", "x": "s2.safetensors"})
    assert main(["compress", str(index), "-o", str(out), "--rank", "20"]) == 0
    capsys.readouterr()
    tensors, _ = _read(out)
    torch.testing.assert_close(tensors["a.B"].double() @ tensors["a.A"].double(),
                               _truncated(right, 20), rtol=1e-4, atol=1e-5)


def test_a_ratio_too_small_for_rank_1_everywhere_is_refused_before_any_svd(
        tmp_path, capsys, monkeypatch):
    # Every weight at rank 1 keeps 0.057 of the weights: --ratio 0.001 cannot
    # hold, and is refused as compress_model refuses it (it wrote 5.7 %).
    tables = {"enc.weight": torch.randn(32, 64), "dec.weight": torch.randn(64, 16)}
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tables, str(path))
    monkeypatch.setattr(lx.svd, "svd_truncate", _no_svd)
    assert main(["compress", str(path), "-o", str(out), "--ratio", "0.001"]) == 1
    line = _one_error_line(capsys, "compress")
    assert "--ratio 0.001 is too small: rank 1 per layer already keeps 0.057" in line
    assert not out.exists()


def _no_svd(*args, **kwargs):
    raise AssertionError("an SVD ran before the refusal")


@pytest.mark.parametrize("dtype, wider", [(torch.float32, "float64"),
                                          (torch.bfloat16, "float64")])
def test_factors_past_the_range_of_float32_name_float64(tmp_path, capsys, dtype, wider):
    # float32 and bfloat16 share a range: a float32 copy would not help.
    W = torch.full((30, 20), 3e38).to(dtype)
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"a.weight": W}, str(path))
    assert main(["compress", str(path), "-o", str(out), "--rank", "2"]) == 1
    line = _one_error_line(capsys, "compress")
    assert f"compress a {wider} copy of the file" in line and not out.exists()


@pytest.mark.parametrize("case", ["mixed_layouts", "name_clash", "bad_include"])
def test_refusals_that_need_no_svd_come_before_any(tmp_path, capsys, monkeypatch, case):
    torch.manual_seed(0)
    tables = {"big.weight": torch.randn(40, 30)}
    if case == "mixed_layouts":  # a compressed model's state_dict: factors in Linear layout
        tables.update({"old.A": torch.randn(2, 10), "old.B": torch.randn(12, 2)})
    elif case == "name_clash":
        tables.update({"big.A": torch.randn(5)})
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tables, str(path))
    monkeypatch.setattr(lx.svd, "svd_truncate", _no_svd)
    monkeypatch.setattr(lx.svd, "scaled_singular_values", _no_svd)
    extra = ["--include", "nothing*"] if case == "bad_include" else []
    assert main(["compress", str(path), "-o", str(out), "--rank", "4", *extra]) == 1
    line = _one_error_line(capsys, "compress")
    assert {"mixed_layouts": "one file cannot mix that",
            "name_clash": "cannot store 'big.weight' as big.A",
            "bad_include": "nothing*"}[case] in line
    assert not out.exists()


def test_the_input_file_or_a_shard_is_never_the_output(tmp_path, capsys):
    torch.manual_seed(0)
    model = build()
    single = tmp_path / "in.safetensors"
    save_model(model, str(single))
    before = single.read_bytes()
    assert main(["compress", str(single), "-o", str(tmp_path / "." / "in.safetensors"),
                 "--rank", "3", "--force"]) == 1
    assert "part of the input" in _one_error_line(capsys, "compress")
    assert single.read_bytes() == before
    # A shard of a checkpoint directory, and its index.
    directory = tmp_path / "ckpt"
    directory.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    shards = {"model-00001-of-00002.safetensors": ["0.weight", "0.bias"],
              "model-00002-of-00002.safetensors": ["2.weight", "2.bias"]}
    for name, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(directory / name))
    index = {"metadata": {}, "weight_map": {k: name for name, keys in shards.items()
                                            for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    for target in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        saved = (directory / target).read_bytes()
        assert main(["compress", str(directory), "-o", str(directory / target),
                     "--rank", "3", "--force"]) == 1
        assert "part of the input" in _one_error_line(capsys, "compress")
        assert (directory / target).read_bytes() == saved
    assert main(["compress", str(directory), "-o", str(tmp_path / "out.safetensors"),
                 "--rank", "3"]) == 0


def test_a_bare_tensor_beside_a_layer_of_its_name(tmp_path, capsys):
    torch.manual_seed(0)
    tables = {"fc": torch.randn(30, 20), "fc.weight": torch.randn(30, 20)}
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tables, str(path))
    # By default the bare tensor stays dense, in the report, and the layer is factorized.
    assert main(["compress", str(path), "-o", str(out), "--rank", "2", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [(l["name"], l["rank"]) for l in layers] == [("fc", None), ("fc", 2)]
    tensors, _ = _read(out)
    assert set(tensors) == {"fc", "fc.A", "fc.B"} and torch.equal(tensors["fc"], tables["fc"])
    # With --all-tensors both would be stored as fc.A / fc.B: refused.
    assert main(["compress", str(path), "-o", str(tmp_path / "all.safetensors"), "--rank", "2",
                 "--all-tensors"]) == 1
    assert "would all be the layer 'fc'" in _one_error_line(capsys, "compress")


@pytest.mark.parametrize("spelling", ["same", "dot"])
def test_spectrum_never_plots_over_its_input(weights, capsys, monkeypatch, spelling):
    """--plot naming the input with --force replaced the weights by a PNG."""
    _, path = weights
    before = path.read_bytes()
    monkeypatch.chdir(path.parent)
    plot = path.name if spelling == "same" else f"./{path.name}"
    assert main(["spectrum", path.name, "--layer", "0", "--plot", plot, "--force"]) == 1
    assert f"--plot {plot} is {path.name}, part of the input" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_spectrum_empty_plot_and_layer_are_not_taken_as_absent(weights, capsys):
    _, path = weights
    assert main(["spectrum", str(path), "--layer", "0", "--plot", ""]) == 1
    assert "--plot is empty; give a file name" in capsys.readouterr().err
    assert main(["spectrum", str(path), "--layer", ""]) == 1
    assert "no tensor ''" in capsys.readouterr().err


def test_an_output_name_longer_than_the_file_system_allows_is_refused_first(weights, tmp_path,
                                                                            capsys):
    """The writability probe used a shortened name: the run failed only at the
    final rename, after all the work."""
    _, path = weights
    out = tmp_path / ("x" * 300 + ".safetensors")
    assert main(["compress", str(path), "-o", str(out), "--rank", "1"]) == 1
    err = capsys.readouterr().err
    assert "its name is 312 bytes, more than the 255 the file system allows" in err
    assert "singular" not in err and not list(tmp_path.glob("*.tmp"))


def _ranks_entry(ranks):
    return {"lowrank_ext": json.dumps({"format": 1, "factors": "stored", "ranks": ranks})}


def test_compress_keeps_every_shard_s_ranks(tmp_path, capsys):
    # Each shard names its own layers: the merged metadata kept the last
    # shard's entry, and the output did not load.
    shards = tmp_path / "shards"
    shards.mkdir()
    torch.manual_seed(0)
    save_file({"a.A": torch.randn(4, 48), "a.B": torch.randn(64, 4)},
              str(shards / "s1.safetensors"), metadata=_ranks_entry({"a": 4}))
    save_file({"b.A": torch.randn(4, 64), "b.B": torch.randn(64, 4),
               "c.weight": torch.randn(8, 8)},
              str(shards / "s2.safetensors"), metadata=_ranks_entry({"b": 4}))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.A": "s1.safetensors", "a.B": "s1.safetensors", "b.A": "s2.safetensors",
        "b.B": "s2.safetensors", "c.weight": "s2.safetensors"}}))
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(shards), "-o", str(out), "--rank", "1000"]) == 0  # c stays dense
    assert json.loads(_read(out)[1]["lowrank_ext"])["ranks"] == {"a": 4, "b": 4}
    model = nn.Module()
    model.a, model.b = nn.Linear(48, 64, bias=False), nn.Linear(64, 64, bias=False)
    model.c = nn.Linear(8, 8, bias=False)
    lx.load_compressed(model, out)
    assert isinstance(model.a, lx.LowRankLinear) and isinstance(model.b, lx.LowRankLinear)


def test_compress_refuses_input_ranks_that_contradict_the_factors(tmp_path, capsys):
    # The report gave the metadata's rank, the output repeated it, and
    # load_compressed refused the file later.
    torch.manual_seed(0)
    bad = tmp_path / "bad.safetensors"
    save_file({"a.A": torch.randn(4, 48), "a.B": torch.randn(64, 4),
               "b.weight": torch.randn(64, 64)}, str(bad), metadata=_ranks_entry({"a": 3}))
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(bad), "-o", str(out), "--rank", "4"]) == 1
    assert (f"{bad} gives layer 'a' rank 3 in its lowrank_ext metadata, but holds a.A of "
            "shape [4, 48] and a.B of shape [64, 4]") in capsys.readouterr().err
    save_file({"a.A": torch.randn(4, 48), "a.B": torch.randn(64, 4),
               "b.weight": torch.randn(64, 64)}, str(bad),
              metadata=_ranks_entry({"a": 4, "ghost": 5}))
    assert main(["compress", str(bad), "-o", str(out), "--rank", "4"]) == 1
    assert "gives layer 'ghost' rank 5 in its lowrank_ext metadata, but holds no tensors " \
           "ghost.A and ghost.B" in capsys.readouterr().err
    assert not out.exists()


def test_energy_checks_what_it_would_write_before_any_svd(tmp_path, capsys, monkeypatch):
    import lowrank_ext.svd as svd

    torch.manual_seed(0)
    mixed = tmp_path / "mixed.safetensors"
    save_file({"old.A": torch.randn(4, 30), "old.B": torch.randn(20, 4),
               "new.weight": torch.randn(40, 30)}, str(mixed))  # pairs without metadata
    spectra = []
    real = svd.scaled_singular_values
    monkeypatch.setattr(svd, "scaled_singular_values",
                        lambda W: spectra.append(W.shape) or real(W))
    assert main(["compress", str(mixed), "-o", str(tmp_path / "o.safetensors"),
                 "--energy", "0.5"]) == 1
    assert "one file cannot mix that" in capsys.readouterr().err
    assert not spectra


def test_spectrum_names_a_tensor_it_cannot_read(tmp_path, capsys):
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("this torch has no float4_e2m1fn_x2")
    path = tmp_path / "fp4.safetensors"
    save_file({"a.weight": torch.randn(16, 16),
               "q.weight": torch.zeros(8, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)},
              str(path))
    assert main(["spectrum", str(path)]) == 0
    assert "cannot read float4_e2m1fn_x2" in capsys.readouterr().out
    assert main(["spectrum", str(path), "--layer", "q"]) == 1
    assert ("tensor 'q.weight' in " in capsys.readouterr().err)
