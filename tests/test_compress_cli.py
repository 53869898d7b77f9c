"""``python -m lowrank_ext compress`` and ``spectrum`` on small safetensors files."""

import json
import math

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
    (["--ratio", "0"], "ratio must be in (0, 1]"),
    (["--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["--rank", "0"], "--rank must be >= 1"),
    (["--energy", "2"], "--energy must be in (0, 1]"),
    (["--rank", "2", "--include", "nothing*"], "include pattern 'nothing*' matches no 2-D weight"),
])
def test_compress_bad_arguments(weights, tmp_path, capsys, extra, message):
    _, path = weights
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(path), "-o", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


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
