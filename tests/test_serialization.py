"""save_compressed / load_compressed: round trips, atomic writes, files that do not fit."""

import copy
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lowrank_ext as lx
from lowrank_ext import serialization


def build():
    """The 'original model code': a fresh, uncompressed model."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 6, bias=False))


@pytest.fixture
def compressed(tmp_path):
    model = build()
    x = torch.randn(50, 16)
    lx.compress_model(model, ratio=0.5, calibration=[x], exclude="4")
    path = tmp_path / "model.safetensors"
    ranks = lx.save_compressed(model, path)
    return model, path, ranks


def test_round_trip(compressed):
    model, path, ranks = compressed
    assert ranks == {n: m.rank for n, m in model.named_modules()
                     if isinstance(m, lx.LowRankLinear)}
    assert set(ranks) == {"0", "2"}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lowrank_ext"])
        assert meta == {"format": 1, "ranks": ranks}
        assert {"0.A", "0.B", "0.bias", "2.A", "4.weight"} <= set(f.keys())
    fresh = lx.load_compressed(build(), path)
    for name, rank in ranks.items():
        assert isinstance(fresh.get_submodule(name), lx.LowRankLinear)
        assert fresh.get_submodule(name).rank == rank
    assert type(fresh[4]) is nn.Linear
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    x = torch.randn(5, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_load_keeps_dtype_and_training_mode(tmp_path):
    model = build().double()
    lx.compress_model(model, rank=3)
    path = tmp_path / "m.safetensors"
    lx.save_compressed(model, path)
    fresh = build().double().eval()
    lx.load_compressed(fresh, path)
    assert fresh[0].A.dtype == torch.float64 and not fresh[0].training


def test_shared_weights_are_stored_once(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = model[0].weight  # tied
    path = tmp_path / "tied.safetensors"
    lx.save_compressed(model, path)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fresh[1].weight = fresh[0].weight
    lx.load_compressed(fresh, path)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    model = build()
    lx.compress_model(model, rank=2, include="0")
    path = tmp_path / "m.safetensors"
    lx.save_compressed(model, path)
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        lx.save_compressed(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind


def _assert_same(model, reference):
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_wrong_model_is_refused_and_left_alone(compressed):
    _, path, _ = compressed
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 20), nn.ReLU(),
                          nn.Linear(20, 6, bias=False))
    reference = copy.deepcopy(other)
    with pytest.raises(RuntimeError, match="does not fit the model"):
        lx.load_compressed(other, path)
    _assert_same(other, reference)

    not_linear = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Identity())
    with pytest.raises(ValueError, match="layer '2' at rank .* has Identity there"):
        lx.load_compressed(not_linear, path)

    missing = nn.Sequential(nn.Linear(16, 32))
    with pytest.raises(ValueError, match="has nothing there"):
        lx.load_compressed(missing, path)


def _stored(path):
    """({key: tensor}, metadata) of a safetensors file, read whole."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


@pytest.mark.parametrize("key, dtype", [("0.A", torch.complex64), ("0.bias", torch.int64),
                                        ("2.B", torch.bool)])
def test_tensors_of_another_kind_are_refused_not_cast(compressed, tmp_path, key, dtype):
    # load_state_dict would cast them silently: a complex factor loses its
    # imaginary part, an integer bias its meaning.
    _, path, _ = compressed
    state, metadata = _stored(path)
    state[key] = (state[key] * (1 + 1j) if dtype.is_complex else state[key]).to(dtype)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad, metadata=metadata)
    model = build()
    reference = copy.deepcopy(model)
    with pytest.raises(TypeError, match=rf"{re.escape(key)} is {str(dtype)[6:]} in the file "
                                        r"but float32 in the model"):
        lx.load_compressed(model, bad)
    _assert_same(model, reference)


def test_float_files_of_another_width_load_cast_as_load_state_dict_does(compressed, tmp_path):
    model, path, _ = compressed
    state, metadata = _stored(path)
    state = {k: t.double() for k, t in state.items()}
    wide = tmp_path / "wide.safetensors"
    save_file(state, wide, metadata=metadata)
    loaded = lx.load_compressed(build(), wide)
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[key], value)


def _write_raw(path, entries, metadata=None):
    """A safetensors file written by hand: {key: (dtype name, shape, bytes)},
    for dtypes torch has no type for."""
    header, offset = {}, 0
    for key, (dtype, shape, data) in entries.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.write(b"".join(data for _, _, data in entries.values()))


def test_a_tensor_torch_cannot_hold_is_named_and_the_model_left_alone(compressed, tmp_path):
    # safetensors' own error type, naming neither the file nor the tensor, came through.
    model, path, _ = compressed
    tensors, metadata = _stored(path)
    entries = {key: ("F32", list(t.shape), t.float().numpy().tobytes())
               for key, t in tensors.items()}
    entries["4.weight"] = ("F6_E2M3", [6, 24], bytes(6 * 24 * 6 // 8))
    odd = tmp_path / "odd.safetensors"
    _write_raw(odd, entries, metadata)
    fresh = build()
    before = copy.deepcopy(fresh)
    with pytest.raises(ValueError, match=f"load_compressed: cannot read tensor '4.weight' of "
                                         f"{re.escape(str(odd))}: .*F6_E2M3"):
        lx.load_compressed(fresh, odd)
    _assert_same(fresh, before)
    # As a tensor the model does not take, strict=False leaves it unread.
    entries["extra.weight"] = entries.pop("4.weight")
    _write_raw(odd, entries, metadata)
    fresh = build()
    lx.load_compressed(fresh, odd, strict=False)
    _assert_same(fresh[:4], model[:4])


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0)])
def test_cpu_device_with_an_index(compressed, device):
    # safetensors refuses "cpu:0", which torch and check_device accept.
    model, path, _ = compressed
    for fresh in (build(), build().to("meta")):
        lx.load_compressed(fresh, path, device=device)
        for (name, theirs), ours in zip(model.state_dict().items(), fresh.state_dict().values()):
            assert ours.device.type == "cpu" and torch.equal(ours, theirs), name


def test_extra_module_in_model_is_refused_when_strict(compressed):
    _, path, _ = compressed
    bigger = nn.Sequential(*build(), nn.Linear(6, 2))
    reference = copy.deepcopy(bigger)
    with pytest.raises(RuntimeError, match="missing from the file: 5.weight"):
        lx.load_compressed(bigger, path)
    _assert_same(bigger, reference)
    lx.load_compressed(bigger, path, strict=False)
    assert isinstance(bigger[0], lx.LowRankLinear)


def test_files_that_are_not_ours(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ValueError, match="no 'lowrank_ext' metadata and no '<layer>.A' / "
                                         "'<layer>.B' factors; it holds no compressed model"):
        lx.load_compressed(build(), plain)
    bad_meta = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad_meta), metadata={"lowrank_ext": "{not json"})
    with pytest.raises(ValueError, match="malformed"):
        lx.load_compressed(build(), bad_meta)
    # Ranks are JSON integers: int() would have read 2.9 as 2 and true as 1.
    for rank in ("2.9", "true", '"2"'):
        odd = tmp_path / "odd_rank.safetensors"
        save_file({"0.A": torch.zeros(2, 16), "0.B": torch.zeros(32, 2)}, str(odd),
                  metadata={"lowrank_ext": f'{{"format": {serialization.FORMAT_VERSION}, '
                                           f'"ranks": {{"0": {rank}}}}}'})
        with pytest.raises(ValueError, match="malformed 'lowrank_ext' metadata"):
            lx.load_compressed(build(), odd)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a safetensors file"):
        lx.load_compressed(build(), garbage)
    with pytest.raises(FileNotFoundError):
        lx.load_compressed(build(), tmp_path / "absent.safetensors")
    with pytest.raises(TypeError, match="nn.Module"):
        lx.save_compressed("model", tmp_path / "x.safetensors")


def test_rank_that_does_not_fit_the_layer(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"0.A": torch.zeros(40, 16)}, str(path),
              metadata=serialization.ranks_metadata({"0": 40}))
    with pytest.raises(ValueError, match="rank 40 stored for layer '0' does not fit"):
        lx.load_compressed(build(), path)


def test_written_file_gets_the_usual_permissions(tmp_path):
    model = build()
    path = tmp_path / "m.safetensors"
    lx.save_compressed(model, path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    os.chmod(path, 0o640)
    lx.save_compressed(model, path)  # overwriting keeps the existing mode
    assert os.stat(path).st_mode & 0o777 == 0o640


# --- bad files and paths -------------------------------------------------------------
def truncations(data):
    """A valid safetensors file's bytes cut at telling places: name -> (bytes, message)."""
    header_len = int.from_bytes(data[:8], "little")
    body = len(data) - 8 - header_len
    return {
        "in the data": (data[:8 + header_len + body // 2],
                        "the file is truncated: its tensors end"),
        "after the header": (data[:8 + header_len], "the file is truncated: its tensors end"),
        "in the header": (data[:8 + header_len // 2], "the file is truncated: its header is"),
        "in the length": (data[:5], "only 5 bytes long"),
        "to nothing": (b"", "the file is empty"),
    }


@pytest.mark.parametrize("cut", ["in the data", "after the header", "in the header",
                                 "in the length", "to nothing"])
def test_truncated_file_is_a_clear_error_and_leaves_the_model_alone(compressed, tmp_path, cut):
    _, path, _ = compressed
    data, message = truncations(path.read_bytes())[cut]
    short = tmp_path / "short.safetensors"
    short.write_bytes(data)
    model = build()
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError) as info:
        lx.load_compressed(model, short)
    text = str(info.value)
    assert text.startswith(f"load_compressed: cannot read {short} as safetensors: ")
    assert message in text
    _assert_same(model, reference)


def test_not_safetensors_names_the_file(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not tensors, just some words in a file\n")
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(text))} as safetensors: "
                                         "it is not a safetensors file"):
        lx.load_compressed(build(), text)
    bad_header = tmp_path / "header.safetensors"
    bad_header.write_bytes((6).to_bytes(8, "little") + b"{nope}")
    with pytest.raises(ValueError, match="its header is malformed"):
        lx.load_compressed(build(), bad_header)


def test_layer_named_in_metadata_without_its_factors(compressed, tmp_path):
    model, path, ranks = compressed
    tensors, _ = _stored(path)
    del tensors["2.B"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=serialization.ranks_metadata(ranks))
    for strict in (True, False):  # without them the layer would keep random factors
        fresh = build()
        reference = copy.deepcopy(fresh)
        message = f"{broken} gives layer '2' rank {ranks['2']} in its metadata but has no " \
                  "tensor '2.B'"
        with pytest.raises(ValueError, match=re.escape(message)):
            lx.load_compressed(fresh, broken, strict=strict)
        _assert_same(fresh, reference)


def test_non_strict_load_keeps_the_original_bias_the_file_lacks(compressed, tmp_path):
    model, path, ranks = compressed
    tensors, _ = _stored(path)
    del tensors["0.bias"]
    no_bias = tmp_path / "no_bias.safetensors"
    save_file(tensors, str(no_bias), metadata=serialization.ranks_metadata(ranks))
    fresh = build()
    original_bias = fresh[0].bias.detach().clone()
    with pytest.raises(RuntimeError, match="missing from the file: 0.bias"):
        lx.load_compressed(fresh, no_bias)
    lx.load_compressed(fresh, no_bias, strict=False)
    assert isinstance(fresh[0], lx.LowRankLinear)
    assert torch.equal(fresh[0].bias.detach(), original_bias)
    assert torch.equal(fresh[0].A.detach(), model[0].A.detach())


def test_missing_layers_are_named_with_the_file(compressed):
    _, path, _ = compressed
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=f"{where} stores layer '2' at rank .* but the model has "
                                         "nothing there"):
        lx.load_compressed(nn.Sequential(nn.Linear(16, 32)), path)
    with pytest.raises(RuntimeError, match=f"{where} does not fit the model: missing from the "
                                           "file: 5.weight, 5.bias"):
        lx.load_compressed(nn.Sequential(*build(), nn.Linear(6, 2)), path)


@pytest.mark.parametrize("bad", [None, 3, ["m.safetensors"]])
def test_path_that_is_not_a_path(bad):
    kind = type(bad).__name__
    with pytest.raises(TypeError, match=f"save_compressed: path must be a str or os.PathLike, "
                                        f"got {kind}"):
        lx.save_compressed(build(), bad)
    with pytest.raises(TypeError, match=f"load_compressed: path must be a str or os.PathLike, "
                                        f"got {kind}"):
        lx.load_compressed(build(), bad)


def test_paths_that_cannot_be_read_or_written(tmp_path):
    model = build()
    with pytest.raises(FileNotFoundError, match=f"load_compressed: {re.escape(str(tmp_path))} is "
                                                "a directory with neither model.safetensors nor"):
        lx.load_compressed(model, tmp_path)
    with pytest.raises(IsADirectoryError, match=f"save_compressed: {re.escape(str(tmp_path))} is a "
                                                "directory"):
        lx.save_compressed(model, tmp_path)
    nowhere = tmp_path / "missing" / "m.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"save_compressed: cannot write {nowhere}: no directory {nowhere.parent}")):
        lx.save_compressed(model, nowhere)
    assert os.listdir(tmp_path) == []


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        lx.save_compressed(build(), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


# --- models built on the meta device ---------------------------------------

class TiedWithBuffers(nn.Module):
    """An embedding tied to its output head, a persistent and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((16,), 0.5))
        self.register_buffer("offset", torch.arange(16.0), persistent=False)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids) * self.scale + self.offset))


def _parameters_on_meta(model):
    """Move only the parameters to meta (buffers stay real), keeping ties,
    as accelerate.init_empty_weights() builds a model."""
    moved = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
                module._parameters[name] = moved[id(p)]
    return model


@pytest.fixture
def tied(tmp_path):
    torch.manual_seed(0)
    model = TiedWithBuffers()
    with torch.no_grad():
        model.scale.uniform_(0.5, 1.5)
    lx.compress_model(model, rank=4, include="body.*")
    path = tmp_path / "tied.safetensors"
    lx.save_compressed(model, path)
    return model, path


def _all_tensors(model):
    return [t for m in model.modules() for t in
            list(m._parameters.values()) + list(m._buffers.values()) if t is not None]


def test_parameters_on_meta_are_created_and_filled_from_the_file(tied):
    model, path = tied
    fresh = _parameters_on_meta(TiedWithBuffers())
    lx.load_compressed(fresh, path)
    assert not any(t.is_meta for t in _all_tensors(fresh))
    assert fresh.head.weight is fresh.embed.weight  # still tied, still one parameter
    assert len(list(fresh.parameters())) == len(list(model.parameters()))
    assert isinstance(fresh.body[0], lx.LowRankLinear) and fresh.body[0].rank == 4
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    ids = torch.randint(0, 10, (3, 5))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    fresh(ids).sum().backward()  # the tied parameter collects both gradients
    assert fresh.embed.weight.grad is not None and fresh.body[0].A.grad is not None


def test_ties_the_file_records_are_restored_on_meta(tied):
    """transformers ties weights after loading; on meta they are separate tensors."""
    model, path = tied
    fresh = TiedWithBuffers()
    fresh.head.weight = nn.Parameter(fresh.embed.weight.detach().clone())  # untied
    fresh = _parameters_on_meta(fresh)
    assert fresh.head.weight is not fresh.embed.weight
    lx.load_compressed(fresh, path)
    assert fresh.head.weight is fresh.embed.weight
    ids = torch.randint(0, 10, (3, 5))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_a_model_all_on_meta_takes_dtype_and_device_from_itself(tmp_path):
    torch.manual_seed(0)
    model = build()
    lx.compress_model(model, rank=3, include="[02]")
    path = tmp_path / "m.safetensors"
    lx.save_compressed(model, path)
    with torch.device("meta"):
        fresh = build().double()
    lx.load_compressed(fresh, path, device="cpu")
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in _all_tensors(fresh))
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), model.double()(x), rtol=0, atol=0)


def _still_on_meta(model, reference_types):
    assert [type(m) for m in model.modules()] == reference_types
    assert all(p.is_meta for p in model.parameters())


def test_meta_tensors_the_file_cannot_fill_are_refused_before_loading(tied):
    _, path = tied
    with torch.device("meta"):
        everything_meta = TiedWithBuffers()  # its non-persistent buffer is in no file
    types = [type(m) for m in everything_meta.modules()]
    with pytest.raises(ValueError, match="tensors on the meta device that .* does not hold.*: "
                                         "offset\\. Build those on a real device"):
        lx.load_compressed(everything_meta, path)
    _still_on_meta(everything_meta, types)

    class Bigger(TiedWithBuffers):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(4, 4)

    bigger = _parameters_on_meta(Bigger())
    types = [type(m) for m in bigger.modules()]
    with pytest.raises(ValueError, match="would stay uninitialized: extra.weight, extra.bias"):
        lx.load_compressed(bigger, path, strict=False)  # strict=False, but meta has no value
    _still_on_meta(bigger, types)


def test_failed_load_puts_the_meta_tensors_back(tied, monkeypatch):
    _, path = tied
    fresh = _parameters_on_meta(TiedWithBuffers())
    types = [type(m) for m in fresh.modules()]

    def broken_read(*args, **kwargs):
        raise OSError("read error")

    monkeypatch.setattr(serialization, "read_tensor", broken_read)
    with pytest.raises(OSError, match="read error"):
        lx.load_compressed(fresh, path)
    _still_on_meta(fresh, types)
    assert fresh.head.weight is fresh.embed.weight


@pytest.mark.parametrize("device, error, message", [
    ("meta", ValueError, "device 'meta' holds no data"),
    ("no-such-device", ValueError, "device 'no-such-device' is not a device"),
    (1.5, TypeError, "device must be a torch.device, str or int, got float"),
] + ([] if torch.cuda.is_available() else [
    ("cuda", ValueError, "device 'cuda' is not available")]) + (
    # A backend this torch lacks: torch's AssertionError came through.
    [] if torch.xpu.is_available() else [("xpu", ValueError, "device 'xpu' is not available")]))
def test_bad_device(tied, device, error, message):
    _, path = tied
    fresh = _parameters_on_meta(TiedWithBuffers())
    with pytest.raises(error, match=f"load_compressed: {message}"):
        lx.load_compressed(fresh, path, device=device)
    assert all(p.is_meta for p in fresh.parameters())


# --- files written without the metadata, directories and shards -------------

def _state_file(model, path, **kwargs):
    """A compressed model's state_dict written by plain safetensors: no ranks metadata."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), **kwargs)


def test_ranks_are_read_from_the_factors_when_the_metadata_is_missing(compressed, tmp_path):
    model, _, ranks = compressed
    path = tmp_path / "state.safetensors"
    _state_file(model, path)
    fresh = lx.load_compressed(build(), path)
    assert {n: m.rank for n, m in fresh.named_modules()
            if isinstance(m, lx.LowRankLinear)} == ranks
    x = torch.randn(5, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_lora_model_is_not_taken_for_a_compressed_one(tmp_path):
    model = build()
    lx.add_lora(model, 2)
    path = tmp_path / "lora.safetensors"
    _state_file(model, path)  # 0.A, 0.B, 0.base.weight, ...
    with pytest.raises(ValueError, match="no '<layer>.A' / '<layer>.B' factors"):
        lx.load_compressed(build(), path)


def _save_sharded(model, folder, parts=2):
    """A directory as transformers writes a sharded checkpoint."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    weight_map = {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = keys[i::parts]
        save_file({k: state[k] for k in chunk}, str(folder / name))
        weight_map.update({k: name for k in chunk})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_directories_single_file_and_sharded(compressed, tmp_path):
    model, path, ranks = compressed
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_bytes(path.read_bytes())
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _save_sharded(model, sharded)
    x = torch.randn(5, 16)
    for where in (single, sharded, sharded / "model.safetensors.index.json"):
        fresh = lx.load_compressed(build(), where)
        assert {n: m.rank for n, m in fresh.named_modules()
                if isinstance(m, lx.LowRankLinear)} == ranks
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_broken_shard_index_and_missing_shard(compressed, tmp_path):
    model, _, _ = compressed
    _save_sharded(model, tmp_path)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file: .*model-00002-of-00002"):
        lx.load_compressed(build(), tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{\"weight_map\": {}}")
    fresh = build()
    reference = copy.deepcopy(fresh)
    with pytest.raises(ValueError, match="is not a safetensors index"):
        lx.load_compressed(fresh, tmp_path)
    _assert_same(fresh, reference)


@pytest.fixture
def tied_under_one_name(tmp_path):
    """(model, its state without head.weight, path): transformers' save_pretrained
    keeps one name of a tied tensor and records no alias."""
    torch.manual_seed(0)
    model = TiedWithBuffers()
    lx.compress_model(model, rank=4, include="body.*")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    path = tmp_path / "tied.safetensors"
    save_file(state, str(path))
    return model, state, path


def test_a_tie_the_file_stores_under_one_name(tied_under_one_name):
    model, _, path = tied_under_one_name
    fresh = lx.load_compressed(TiedWithBuffers(), path)
    assert fresh.head.weight is fresh.embed.weight
    ids = torch.randint(0, 10, (3, 5))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


class DeclaresItsTies(TiedWithBuffers):
    """Ties its head only when asked, as transformers models built on meta may."""

    def __init__(self):
        super().__init__()
        self.head.weight = nn.Parameter(self.embed.weight.detach().clone())

    def tie_weights(self):
        self.head.weight = self.embed.weight


def test_declared_ties_are_made_for_meta_models_and_undone_on_failure(tied_under_one_name):
    model, state, path = tied_under_one_name
    fresh = _parameters_on_meta(DeclaresItsTies())
    lx.load_compressed(fresh, path)
    assert fresh.head.weight is fresh.embed.weight
    ids = torch.randint(0, 10, (3, 5))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)

    del state["body.0.bias"]
    save_file(state, str(path))
    fresh = _parameters_on_meta(DeclaresItsTies())
    with pytest.raises(RuntimeError, match="missing from the file: body.0.bias"):
        lx.load_compressed(fresh, path)
    assert fresh.head.weight is not fresh.embed.weight  # as it was built
    assert type(fresh.body[0]) is nn.Linear


def test_replaced_layers_keep_their_requires_grad_flags(compressed):
    _, path, _ = compressed
    fresh = build()
    fresh[0].requires_grad_(False)
    fresh[2].bias.requires_grad_(False)
    lx.load_compressed(fresh, path)
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == {
        "0.A": False, "0.B": False, "0.bias": False, "2.A": True, "2.B": True,
        "2.bias": False, "4.weight": True}


class _OwnsAandB(nn.Module):
    """A module that is no Linear layer but has parameters called A and B."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.randn(3, 4))
        self.B = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return x @ (self.B @ self.A)


def test_parameters_called_a_and_b_of_other_modules_are_not_taken_for_factors(tmp_path):
    def build_mixed():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), _OwnsAandB())

    torch.manual_seed(0)
    model = build_mixed()
    lx.compress_model(model, rank=2, include="2")
    path = tmp_path / "state.safetensors"
    _state_file(model, path)
    fresh = lx.load_compressed(build_mixed(), path)
    assert isinstance(fresh[2], lx.LowRankLinear) and isinstance(fresh[3], _OwnsAandB)
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

    plain = tmp_path / "plain.safetensors"
    _state_file(build_mixed(), plain)  # nothing compressed; only the module's own A and B
    with pytest.raises(ValueError, match="no '<layer>.A' / '<layer>.B' factors of the model's "
                                         "Linear layers"):
        lx.load_compressed(build_mixed(), plain)


class EmbeddingAndHead(nn.Module):
    def __init__(self, head_out=10, tie=True):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, head_out, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.embed(ids))))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _saved_with_mid_compressed(tmp_path, **kwargs):
    """An EmbeddingAndHead with its mid layer compressed, and the file it was saved to."""
    torch.manual_seed(0)
    saved = EmbeddingAndHead(**kwargs)
    lx.compress_model(saved, rank=4, include="mid")
    path = tmp_path / "saved.safetensors"
    lx.save_compressed(saved, path)
    return saved, path


def test_a_shape_that_only_an_alias_names_is_checked_before_any_copy(tmp_path):
    # The file stores the tied head once, as embed.weight (10×16), and names
    # head.weight as its alias; this model's untied head is 12×16.
    saved, path = _saved_with_mid_compressed(tmp_path)
    model = EmbeddingAndHead(head_out=12, tie=False)
    before = _state(model)
    with pytest.raises(RuntimeError, match=r"head\.weight has shape \[10, 16\] in the file "
                                           r"\(stored as embed\.weight\) but \[12, 16\]"):
        lx.load_compressed(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the embedding too
    assert type(model.mid) is nn.Linear


def test_a_tie_the_file_does_not_have_is_refused_not_loaded_half(tmp_path):
    # Saved untied (different values under embed.weight and head.weight);
    # loading both into the model's one tied tensor would keep one of them.
    saved, path = _saved_with_mid_compressed(tmp_path, tie=False)
    model = EmbeddingAndHead(tie=True)
    before = _state(model)
    with pytest.raises(RuntimeError, match="the model ties embed.weight and head.weight .one "
                                           "tensor., but .* stores different values"):
        lx.load_compressed(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert type(model.mid) is nn.Linear
    # Equal values under both names (a tied model saved without the tie) load.
    with torch.no_grad():
        saved.head.weight.copy_(saved.embed.weight)
    lx.save_compressed(saved, path)
    lx.load_compressed(model, path)
    ids = torch.randint(0, 10, (3, 5))
    torch.testing.assert_close(model(ids), saved(ids))


# --- hooks, parametrizations and compiled models ---------------------------------------

def _hook_layer(layer, seen):
    """A forward pre-hook, a forward hook taking kwargs, one that runs even when
    forward raises, and a full backward hook on ``layer``, each recording its
    kind and the module it ran on. Returns their handles."""
    return [layer.register_forward_pre_hook(lambda m, args: seen.append(("pre", m))),
            layer.register_forward_hook(lambda m, args, kwargs, out: seen.append(("fwd", m)),
                                        with_kwargs=True),
            layer.register_forward_hook(lambda m, args, out: seen.append(("always", m)),
                                        always_call=True),
            layer.register_full_backward_hook(lambda m, gi, go: seen.append(("bwd", m)))]


def _hooks_run(model, x, seen):
    seen.clear()
    model(x).sum().backward()
    return [kind for kind, _ in seen], {id(m) for _, m in seen}


def test_hooks_move_to_the_layers_that_replace_them(tmp_path):
    # As torch's quantization swap carries them: compress_model and
    # load_compressed used to drop them with the replaced layer.
    x = torch.randn(5, 16)
    model, seen = build(), []
    handles = _hook_layer(model[2], seen)
    lx.compress_model(model, rank=4, progress=False)
    assert _hooks_run(model, x, seen) == (["pre", "fwd", "always", "bwd"], {id(model[2])})
    path = tmp_path / "m.safetensors"
    lx.save_compressed(model, path)
    fresh, fresh_seen = build(), []
    _hook_layer(fresh[2], fresh_seen)
    lx.load_compressed(fresh, path)
    assert isinstance(fresh[2], lx.LowRankLinear)
    assert _hooks_run(fresh, x, fresh_seen) == (["pre", "fwd", "always", "bwd"], {id(fresh[2])})
    fresh_seen.clear()
    with pytest.raises(ValueError, match="x has k=7 features"):
        fresh[2](torch.randn(5, 7))
    assert [kind for kind, _ in fresh_seen] == ["pre", "always"]
    for handle in handles:  # their handles still remove them
        handle.remove()
    assert _hooks_run(model, x, seen) == ([], set())


def test_hooks_stay_on_the_layer_add_lora_wraps_and_merge_lora_puts_back():
    # The no-op pre-hook that keeps an encoder layer off its fused path
    # leaves with the LoRALinear (keep_off_fused_encoder_paths): merge_lora
    # puts back a plain Linear with the user's hook alone.
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    seen = []
    handle = model.linear1.register_forward_pre_hook(lambda m, args: seen.append(m))
    hook = model.linear1._forward_pre_hooks[handle.id]
    lx.add_lora(model, 2, include="linear1")
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        model(x)
    # The hook stays on the wrapped layer, which the adapter still runs (as in peft).
    assert isinstance(model.linear1, lx.LoRALinear) and seen == [model.linear1.base]
    assert not model.linear1._forward_hooks
    lx.merge_lora(model)
    assert type(model.linear1) is nn.Linear
    assert list(model.linear1._forward_pre_hooks.values()) == [hook]
    seen.clear()
    with torch.no_grad():
        model(x)
    assert seen == [model.linear1]
    handle.remove()
    assert not model.linear1._forward_pre_hooks


def test_backward_hooks_of_both_kinds_are_refused_where_they_would_meet():
    # torch runs one kind per module: merge_lora would put the adapter's
    # full backward hook on a base layer holding an old-style one. It is
    # refused before any adapter is merged or taken out.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    lx.add_lora(model, 2)
    model[2].register_full_backward_hook(lambda m, gi, go: None)
    model[2].base.register_backward_hook(lambda m, gi, go: None)
    with pytest.raises(RuntimeError, match="cannot replace '2': the module there and the one "
                                           "replacing it have backward hooks of both kinds"):
        lx.merge_lora(model)
    assert isinstance(model[0], lx.LoRALinear) and isinstance(model[2], lx.LoRALinear)
    assert not model[0].merged and not model[2].merged


@pytest.mark.parametrize("reparametrize", [
    lambda layer: nn.utils.weight_norm(layer),
    lambda layer: nn.utils.spectral_norm(layer),
    lambda layer: nn.utils.prune.l1_unstructured(layer, "weight", amount=0.3),
], ids=["weight_norm", "spectral_norm", "prune"])
def test_torch_weight_hooks_stay_with_the_layer_they_recompute(reparametrize):
    # These keep the layer an nn.Linear and recompute its weight in a forward
    # pre-hook from tensors only it has (weight_g, weight_orig, weight_mask):
    # moved to the LowRankLinear, they failed at its first call.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    reparametrize(model[0])
    dense = model[0].weight.detach().double()  # as the hook last computed it
    lx.compress_model(model, rank=16, include="0", progress=False)
    assert isinstance(model[0], lx.LowRankLinear) and not model[0]._forward_pre_hooks
    U, S, Vh = torch.linalg.svd(dense)
    expected = U[:, :16] @ torch.diag(S[:16]) @ Vh[:16]
    torch.testing.assert_close((model[0].B @ model[0].A).double(), expected,
                               rtol=1e-4, atol=1e-4)
    model(torch.randn(3, 64))  # the forward runs


def test_hooks_of_a_base_and_its_adapter_meet_on_merging():
    # merge_lora puts the base layer back in the adapter's place: the
    # adapter's hooks join the base's, whose handles still remove them.
    model = nn.Sequential(nn.Linear(8, 8))
    lx.add_lora(model, 2)
    seen = []
    on_base = model[0].base.register_forward_hook(lambda m, a, out: seen.append("base"))
    model[0].register_forward_hook(lambda m, a, out: seen.append("adapter"))
    lx.merge_lora(model)
    model(torch.randn(2, 8))
    assert seen == ["base", "adapter"]
    on_base.remove()
    seen.clear()
    model(torch.randn(2, 8))
    assert seen == ["adapter"]


class _Attends(nn.Module):
    def __init__(self, extra=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)
        if extra:  # a layer the file lacks: a strict load fails after the swaps
            self.more = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_a_failed_load_puts_the_hooks_back_on_the_original_modules(tmp_path):
    model = _Attends()
    lx.split_attention(model)
    lx.compress_model(model, rank=4, include="fc", progress=False)
    path = tmp_path / "m.safetensors"
    lx.save_compressed(model, path)
    fresh, seen = _Attends(extra=True), []
    attn, fc = fresh.attn, fresh.fc
    attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(m), with_kwargs=True)
    fc.register_forward_pre_hook(lambda m, args: seen.append(m))
    with pytest.raises(RuntimeError, match="missing from the file: more.weight"):
        lx.load_compressed(fresh, path)
    assert fresh.attn is attn and fresh.fc is fc
    fresh(torch.randn(2, 3, 16))
    assert seen == [attn, fc]


class _Halved(nn.Module):
    def forward(self, A):
        return 0.5 * A


def test_a_parametrized_low_rank_layer_is_refused_before_writing(tmp_path):
    # Its factor would be stored as "2.parametrizations.A.original", which
    # load_compressed cannot put anywhere.
    from torch.nn.utils import parametrize

    model = build()
    lx.compress_model(model, rank=4, progress=False)
    parametrize.register_parametrization(model[2], "A", _Halved())
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"save_compressed: the model has LowRankLinear layers "
                                         r"with parametrizations \(torch.nn.utils.parametrize\): "
                                         r"2 \(on A\); load_compressed cannot rebuild them"):
        lx.save_compressed(model, path)
    assert not path.exists()
    x = torch.randn(5, 16)
    expected = model(x)
    parametrize.remove_parametrizations(model[2], "A")  # as the message says
    lx.save_compressed(model, path)
    torch.testing.assert_close(lx.load_compressed(build(), path)(x), expected)


def test_a_compiled_model_is_saved_and_loaded_under_its_modules_names(tmp_path):
    # Compiling is lazy: nothing here calls a compiled model.
    model = build()
    lx.compress_model(model, rank=4, progress=False)
    x = torch.randn(5, 16)
    path = tmp_path / "m.safetensors"
    assert lx.save_compressed(torch.compile(model), path) == {"0": 4, "2": 4, "4": 4}
    with safe_open(str(path), framework="pt") as f:
        assert not any(key.startswith("_orig_mod") for key in f.keys())
    torch.testing.assert_close(lx.load_compressed(build(), path)(x), model(x), rtol=0, atol=0)
    compiled = torch.compile(build())
    assert lx.load_compressed(compiled, path) is compiled
    torch.testing.assert_close(compiled._orig_mod(x), model(x), rtol=0, atol=0)
    # A compiled model's own state_dict has the wrapper's names: it loads
    # into a compiled model, and a plain one is told why it does not.
    wrapped = tmp_path / "wrapped.safetensors"
    _state_file(torch.compile(model), wrapped)
    plain = build()
    with pytest.raises(ValueError, match="every tensor name in .* starts with '_orig_mod.': "
                                         ".* load it into torch.compile\\(model\\)"):
        lx.load_compressed(plain, wrapped)
    assert type(plain[0]) is nn.Linear
    compiled = torch.compile(build())
    lx.load_compressed(compiled, wrapped)
    torch.testing.assert_close(compiled._orig_mod(x), model(x), rtol=0, atol=0)


# --- edges found in review ---------------------------------------------------

class _UsedTwice(nn.Module):
    """One layer registered under two names (an encoder reused as decoder)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = self.enc

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("named", ["every place", "first place"])
def test_a_layer_registered_under_two_names_is_restored_in_both(tmp_path, strict, named):
    # The load swapped only the first name: the other kept a dense layer with
    # its random initial weights (strict=False), silently.
    torch.manual_seed(0)
    model = _UsedTwice()
    model.enc = model.dec = lx.LowRankLinear.from_linear(model.enc, rank=2)
    path = tmp_path / "m.safetensors"
    assert lx.save_compressed(model, path) == {"enc": 2, "dec": 2}
    if named == "first place":  # files written before the metadata named every place
        tensors, metadata = _stored(path)
        metadata["lowrank_ext"] = json.dumps({"format": 1, "ranks": {"enc": 2}})
        save_file(tensors, str(path), metadata=metadata)
    fresh = _UsedTwice()
    lx.load_compressed(fresh, path, strict=strict)
    assert isinstance(fresh.enc, lx.LowRankLinear) and fresh.enc is fresh.dec
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


def _views_of_one_tensor():
    model = nn.Module()
    model.lin = nn.Linear(4, 4)
    memory = torch.arange(12.0)
    model.register_buffer("whole", memory)
    model.register_buffer("part", memory[2:5])  # overlaps whole
    other = torch.arange(6.0)
    model.register_buffer("low", other[:3])  # two disjoint halves of one tensor
    model.register_buffer("high", other[3:])
    model.strided = nn.Parameter(torch.randn(4, 6)[:, ::2])  # not contiguous
    model.enc = nn.Linear(3, 3, bias=False)
    model.dec = nn.Linear(3, 3, bias=False)
    model.dec.weight = nn.Parameter(model.enc.weight.t())  # tied transposed
    return model


def test_views_of_part_of_a_tensor_are_stored_as_themselves(tmp_path):
    # safetensors' save_model took overlapping tensors for one tensor under
    # several names: it failed on slices and transposes, and stored `part` as
    # an alias of `whole`, a file that could not be loaded back.
    torch.manual_seed(0)
    model = _views_of_one_tensor()
    lx.compress_model(model, rank=2, include="lin", progress=False)
    path = tmp_path / "m.safetensors"
    lx.save_compressed(model, path)
    fresh = _views_of_one_tensor()
    for t in fresh.parameters():
        nn.init.zeros_(t)
    lx.load_compressed(fresh, path)
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert fresh.part.tolist() == [2.0, 3.0, 4.0]


def test_a_tied_tensor_is_stored_once_under_its_first_name(tmp_path):
    model = nn.Module()
    model.b = nn.Linear(4, 4)
    model.a = nn.Linear(4, 4)
    model.a.weight = model.b.weight
    path = tmp_path / "m.safetensors"
    lx.save_compressed(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["a.bias", "a.weight", "b.bias"]
        assert f.metadata()["b.weight"] == "a.weight"


def test_a_failed_write_of_safetensors_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"part")
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    path = tmp_path / "m.safetensors"
    with pytest.raises(OSError, match=re.escape(f"save_compressed: cannot write {path}: Error "
                                                "while serializing: I/O error: No space")):
        lx.save_compressed(build(), path)
    assert os.listdir(tmp_path) == []


def test_the_file_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda *a: (events.append("replace"), replace(*a))[1])
    lx.save_compressed(build(), tmp_path / "m.safetensors")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, the directory


def test_a_name_near_the_file_system_limit_can_be_written(tmp_path):
    # The temporary file's name added 14 characters to it.
    path = tmp_path / ("m" * 240 + ".safetensors")
    lx.save_compressed(build(), path)
    assert os.listdir(tmp_path) == [path.name]


def test_paths_with_a_nul_character_are_refused():
    with pytest.raises(ValueError, match=r"save_compressed: path contains a NUL character"):
        lx.save_compressed(build(), "m\0.safetensors")
    with pytest.raises(ValueError, match=r"load_compressed: path contains a NUL character"):
        lx.load_compressed(build(), "m\0.safetensors")


def test_a_file_that_cannot_be_read_is_an_oserror_naming_it(tmp_path, monkeypatch):
    # A file in a directory that may not be searched was "no such file", one
    # without read permission a ValueError; both are permission errors. (The
    # tests may run as root, whom permissions do not stop: os.stat stands in.)
    path = tmp_path / "m.safetensors"
    lx.save_compressed(build(), path)
    stat = os.stat

    def no_search(p, *args, **kwargs):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied")
        return stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", no_search)
    with pytest.raises(PermissionError, match=re.escape(f"load_compressed: cannot read {path}: "
                                                        "Permission denied")):
        lx.load_compressed(build(), path)


@pytest.mark.parametrize("info, message", [
    ({"format": True, "ranks": {"0": 2}}, "'format' must be an integer, got True"),
    ({"format": 1.0, "ranks": {"0": 2}}, "'format' must be an integer, got 1.0"),
    ({"format": 2, "ranks": {"0": 2}}, "is in format version 2 of lowrank_ext files; this "
                                       "version reads format 1"),
    ({"format": 1, "ranks": {"0": "2"}}, "ranks must be integers, got '0': \"2\""),
    ({"format": 1, "ranks": [["0", 2]]}, "'ranks' must be an object of layer name: rank"),
    ({"format": 1, "ranks": {"0": 2}, "factors": "other"}, "'factors' must be one of 'linear', "
                                                           "'stored', got 'other'"),
    ({"format": 1, "ranks": {}}, r"holds the factors of 0 \(<layer>.A and <layer>.B\), Linear "
                                 "layers of the model, but its 'lowrank_ext' metadata gives "
                                 "them no rank"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_metadata_that_is_wrong_says_what_is_wrong(tmp_path, info, message, strict):
    model = build()
    lx.compress_model(model, rank=2, include="0", progress=False)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"lowrank_ext": json.dumps(info)})
    fresh = build()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=message):
        lx.load_compressed(fresh, path, strict=strict)
    assert type(fresh[0]) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_a_json_file_is_not_a_safetensors_file(tmp_path):
    # Its first 8 bytes read as a huge header length: it was "truncated".
    # (JSON of some other kind, whose ninth byte opens an object.)
    path = tmp_path / "m.safetensors"
    path.write_text('{"rank":{"0": 2}}')
    assert path.read_bytes()[8:9] == b"{"
    with pytest.raises(ValueError, match=r"it is not a safetensors file \(header length"):
        lx.load_compressed(build(), path)


def test_an_interrupted_split_while_loading_leaves_the_model_as_it_was(tmp_path,
                                                                           interrupt_swap):
    def attention_pair():
        model = nn.Module()
        model.a1 = nn.MultiheadAttention(8, 2)
        model.a2 = nn.MultiheadAttention(8, 2)
        return model

    model = attention_pair()
    lx.split_attention(model)
    lx.compress_model(model, rank=2, include="a1.q_proj", progress=False)
    lx.save_compressed(model, tmp_path / "m.safetensors")
    fresh = attention_pair()
    before = (fresh.a1, fresh.a2)
    calls = interrupt_swap(2)
    with pytest.raises(KeyboardInterrupt):
        lx.load_compressed(fresh, tmp_path / "m.safetensors")
    assert calls == ["a1", "a2"]
    assert (fresh.a1, fresh.a2) == before


@pytest.mark.parametrize("on_meta", [False, True], ids=["built", "meta"])
def test_loading_under_inference_mode_leaves_a_trainable_model(tmp_path, on_meta):
    # The LowRankLinear layers (and a meta model's tensors) were made as
    # inference tensors there: Parameters that said they required gradients
    # and failed in backward ("Inference tensors cannot be saved for backward").
    def build():
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))

    torch.manual_seed(0)
    model = build()
    lx.compress_model(model, rank=4, progress=False)
    lx.save_compressed(model, tmp_path / "c.safetensors")
    if on_meta:
        with torch.device("meta"):
            fresh = build()
    else:
        fresh = build()
    with torch.inference_mode():
        lx.load_compressed(fresh, tmp_path / "c.safetensors", device="cpu" if on_meta else None)
    assert not any(p.is_inference() for p in fresh.parameters())
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    fresh(x).sum().backward()
    assert fresh[0].A.grad is not None and fresh[2].bias.grad is not None


def test_loading_outside_inference_mode_into_inference_tensors_changes_nothing(tmp_path):
    # torch refused to write into the LayerNorm's inference tensors only after
    # the Linear layers had been swapped: the model was left half loaded.
    def build():
        return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))

    model = build()
    lx.compress_model(model, rank=4, progress=False)
    lx.save_compressed(model, tmp_path / "c.safetensors")
    with torch.inference_mode():
        fresh = build()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"load_compressed: the model's tensors .*0\.weight.* "
                                           "are inference tensors"):
        lx.load_compressed(fresh, tmp_path / "c.safetensors")
    assert [type(m) for m in fresh] == [nn.Linear, nn.LayerNorm, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with torch.inference_mode():
        lx.load_compressed(fresh, tmp_path / "c.safetensors")
    x = torch.randn(3, 16)
    with torch.no_grad():  # (the LayerNorm's inference tensors cannot be saved for backward)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_save_compressed_refuses_what_safetensors_or_load_compressed_cannot_take(tmp_path):
    # torch's hook-based weight_norm and pruning stored A_g/A_v or B_orig/B_mask,
    # which load_compressed refused later; extra state, meta and sparse
    # tensors failed in torch's or safetensors' words (an AttributeError).
    from torch.nn.utils import prune

    def compressed():
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        lx.compress_model(model, rank=2, progress=False)
        return model

    path = tmp_path / "m.safetensors"
    model = compressed()
    torch.nn.utils.weight_norm(model[0], name="A")
    prune.l1_unstructured(model[2], "B", amount=0.5)
    with pytest.raises(ValueError, match=r"save_compressed: LowRankLinear layer\(s\) 0 \(holding "
                                         r"A_g, A_v\); 2 \(holding B_mask, B_orig\) store other "
                                         r"tensors than A, B and bias"):
        lx.save_compressed(model, path)

    class WithExtraState(nn.Module):
        def get_extra_state(self):
            return {"step": 3}

        def set_extra_state(self, state):
            pass

    model = compressed()
    model.add_module("state", WithExtraState())
    with pytest.raises(TypeError, match=r"save_compressed: model.state_dict\(\) holds "
                                        r"state._extra_state, a dict"):
        lx.save_compressed(model, path)
    model = compressed()
    model.register_buffer("mask", torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match=r"save_compressed: mask is a torch.sparse_coo tensor"):
        lx.save_compressed(model, path)
    model = compressed().to("meta")
    with pytest.raises(ValueError, match=r"save_compressed: 0.A is on the meta device"):
        lx.save_compressed(model, path)
    assert not path.exists()
