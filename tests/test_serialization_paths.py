"""save_compressed's output paths, and load_compressed of a file saved from a bare layer."""

import os

import pytest
import torch
from torch import nn

import lowrank_ext as lx


def _files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("path, error, message", [
    ("", ValueError, "save_compressed: path is empty; give a file name"),
    ("no_such_dir/", IsADirectoryError,
     "save_compressed: path 'no_such_dir/' names a directory, not a file"),
    ("no_such_dir/.", IsADirectoryError,
     "save_compressed: path 'no_such_dir/.' names a directory, not a file"),
    ("no_such_dir/..", IsADirectoryError,
     "save_compressed: path 'no_such_dir/..' names a directory, not a file"),
    ("../", IsADirectoryError, "save_compressed: ../ is a directory"),
])
def test_a_path_naming_no_file_is_refused_writing_nothing(tmp_path, monkeypatch, path, error,
                                                          message):
    model = nn.Sequential(nn.Linear(8, 8))
    lx.compress_model(model, rank=1, progress=False)
    (tmp_path / "inner").mkdir()
    monkeypatch.chdir(tmp_path / "inner")
    with pytest.raises(error) as info:
        lx.save_compressed(model, path)
    assert str(info.value).startswith(message)
    assert _files_under(tmp_path) == []


def test_a_bare_layer_s_file_into_a_bare_linear_is_refused_unchanged(tmp_path):
    path = tmp_path / "layer.safetensors"
    saved = lx.LowRankLinear.from_linear(nn.Linear(16, 12), rank=3)
    assert lx.save_compressed(saved, path) == {"": 3}
    layer = nn.Linear(16, 12)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=r"the model is itself an nn.Linear, which cannot replace "
                                        r"itself in place; load into "
                                        r"lx.LowRankLinear\(16, 12, 3\) instead"):
        lx.load_compressed(layer, path)
    assert type(layer) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    # What the message suggests works.
    fresh = lx.load_compressed(lx.LowRankLinear(16, 12, 3), path)
    for key, value in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_bias_free_bare_layer_s_file_names_bias_false(tmp_path):
    path = tmp_path / "layer.safetensors"
    lx.save_compressed(lx.LowRankLinear(10, 6, 2, bias=False), path)
    with pytest.raises(TypeError, match=r"lx.LowRankLinear\(10, 6, 2, bias=False\)"):
        lx.load_compressed(nn.Linear(10, 6, bias=False), path)
    lx.load_compressed(lx.LowRankLinear(10, 6, 2, bias=False), path)
