"""save_compressed's output paths, and load_compressed of a file saved from a bare layer."""

import os
import re

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


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_path_that_is_no_regular_file_is_refused_and_kept(tmp_path):
    # atomic_write renamed its file onto the path: a FIFO (or a device like
    # /dev/null) became a regular file.
    import stat

    model = nn.Sequential(nn.Linear(8, 8))
    lx.compress_model(model, rank=1, progress=False)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=re.escape(f"save_compressed: path {fifo} is not a "
                                                   "regular file (a device, FIFO or socket)")):
        lx.save_compressed(model, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _files_under(tmp_path) == ["fifo"]
    # A link to a FIFO too; a link to a regular file is replaced, its target kept.
    (tmp_path / "to_fifo").symlink_to(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        lx.save_compressed(model, tmp_path / "to_fifo")
    assert (tmp_path / "to_fifo").is_symlink()
    (tmp_path / "target").write_bytes(b"keep me")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    lx.save_compressed(model, tmp_path / "link")
    assert not (tmp_path / "link").is_symlink()
    assert (tmp_path / "target").read_bytes() == b"keep me"
    assert lx.load_compressed(nn.Sequential(nn.Linear(8, 8)), tmp_path / "link")[0].rank == 1


def test_a_key_in_a_shard_its_index_does_not_put_there_is_refused(tmp_path):
    # Every key of every shard was read, the last shard's copy winning over
    # the one the index's weight_map names.
    import json

    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(8, 6))
    lx.compress_model(model, rank=2, progress=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: state[k] for k in ("0.A", "0.B")}, str(tmp_path / "s1.safetensors"))
    save_file({"0.bias": state["0.bias"], "0.A": torch.zeros_like(state["0.A"])},
              str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "0.A": "s1.safetensors", "0.B": "s1.safetensors", "0.bias": "s2.safetensors"}}))
    fresh = nn.Sequential(nn.Linear(8, 6))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(
            f"load_compressed: {tmp_path / 's2.safetensors'} holds 0.A, which the weight_map "
            f"of {tmp_path / 'model.safetensors.index.json'} does not put in that shard")):
        lx.load_compressed(fresh, tmp_path)
    assert type(fresh[0]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    save_file({"0.bias": state["0.bias"]}, str(tmp_path / "s2.safetensors"))
    lx.load_compressed(fresh, tmp_path)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_name_of_multibyte_characters_within_the_limit_is_written(tmp_path):
    # The temporary file beside it was cut to 100 characters, up to 400
    # bytes: a 255-byte name the file system takes was refused.
    import lowrank_ext as lx

    name = "模" * 81 + ".safetensors"  # 255 bytes
    try:
        (tmp_path / name).write_bytes(b"")
        (tmp_path / name).unlink()
    except OSError:
        pytest.skip("this file system does not take a 255-byte name")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lx.compress_model(model, rank=2, progress=False)
    lx.save_compressed(model, tmp_path / name)
    assert (tmp_path / name).exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]
