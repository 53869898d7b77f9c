"""The bench command on a tiny shape: runs, prints a table, writes valid JSON."""

import json
import os
import sys

import pytest
import torch

from lowrank_ext import bench, cli


def run_cli(argv):
    return cli.main(["bench"] + argv)


def test_cpu_bench_writes_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    md = tmp_path / "bench.md"
    rc = run_cli(["--shapes", "3,10,2,7;1,5,1,4", "--dtype", "float32,bfloat16",
                  "--sides", "ours,compose,dense", "--rounds", "2", "--batch-ms", "0.5",
                  "--warmup-s", "0", "--json", str(path), "--markdown", str(md)])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "compose / ours" in out and "| 3, 10, 2, 7 | float32 | fwd |" in out
    assert "[8/8]" in err  # progress lines
    result = json.loads(path.read_text())
    assert result["device"] == "cpu"
    assert result["command"].startswith("python -m lowrank_ext") or "bench" in result["command"]
    machine = result["machine"]
    for key in ("cpu_model", "cpu_vector_flags", "torch_threads", "torch_version", "torch_blas"):
        assert key in machine
    assert len(result["results"]) == 2 * 2 * 2  # shapes x dtypes x modes
    for entry in result["results"]:
        assert set(entry["sides"]) == {"ours", "compose", "dense"}
        for side in entry["sides"].values():
            assert side["median_us"] > 0 and len(side["samples_us"]) == 2
            assert side["page_faults_per_call"] >= 0
        assert all(v > 0 for v in entry["ratios"].values())
    assert "compose / ours" in md.read_text()


def test_compiled_side_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    rc = run_cli(["--shapes", "2,8,2,8", "--dtype", "float32", "--modes", "fwd",
                  "--sides", "ours,compiled", "--rounds", "1", "--batch-ms", "0.2",
                  "--warmup-s", "0", "--quiet", "--json", str(path), "--plot", str(png)])
    assert rc == 0
    assert png.stat().st_size > 1000
    assert "compiled" in json.loads(path.read_text())["results"][0]["ratios"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
def test_page_fault_count_sees_freshly_mapped_memory():
    import mmap

    from lowrank_ext import bench

    size, page = 64 << 20, mmap.PAGESIZE
    fresh = mmap.mmap(-1, size)  # anonymous, not mapped in until written
    before = bench._minor_page_faults()
    for offset in range(0, size, page):
        fresh[offset] = 1
    faults = bench._minor_page_faults() - before
    fresh.close()
    # One fault per page, or per 2 MB where transparent huge pages are on.
    assert faults >= size // (2 << 20)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_one_line_error(capsys):
    assert run_cli(["--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA GPU" in err


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "", "4,0,4,4", "0,4,4,4", "4,4,-1,4",
                                  "3,5,²,4", "3,５,2,4",
                                  # spaces inside a number: once read as 45, 64, 12
                                  "1,4,2,4 5", "16, 4096, 6 4, 4096", "1 2,8,2,8"])
def test_bad_shapes_are_rejected(text):
    with pytest.raises(ValueError):
        bench.parse_shapes(text)


@pytest.mark.parametrize("argv, message", [
    (["--shapes", ""], "no shapes given"),
    (["--dtype", ""], "no dtypes given"),
    (["--dtype", ","], "no dtypes given"),
    (["--shapes", "4,0,4,4"], "M, k, r and d must be at least 1"),
    (["--json", "/proc/no/such/dir/b.json"], "b.json"),
    (["--plot", "b.unknownext"], "matplotlib cannot write 'unknownext' images"),
])
def test_bad_arguments_fail_before_any_timing(argv, message, capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    assert run_cli(argv + ["--shapes", "2,8,2,8"] if "--shapes" not in argv else argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and not timed


@pytest.mark.parametrize("second", ["--markdown", "--plot"])
def test_two_outputs_naming_one_file_are_refused(second, capsys, tmp_path, monkeypatch):
    if second == "--plot":
        pytest.importorskip("matplotlib")
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    same = tmp_path / "b.png"
    assert run_cli(["--shapes", "2,8,2,8", "--json", str(same),
                    second, str(tmp_path / "." / "b.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"--json and {second} name the same file" in err and not timed
    assert not same.exists()


def test_a_plot_without_matplotlib_fails_before_any_timing(capsys, monkeypatch):
    _no_matplotlib(monkeypatch)
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    assert run_cli(["--shapes", "2,8,2,8", "--plot", "b.png"]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err and not timed


def test_shapes_and_dtypes_parse():
    assert bench.parse_shapes("1,2,3,4; 5x6x7x8") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert bench.parse_shapes(" 16, 4096 ,64,4096 ; 1 x 2 x 3 x 4 ") == [(16, 4096, 64, 4096),
                                                                     (1, 2, 3, 4)]
    assert bench.parse_dtypes("bf16,float32") == ["bfloat16", "float32"]


def test_lora_op_times_peft_style_sides(tmp_path, capsys):
    path = tmp_path / "lora.json"
    rc = run_cli(["--op", "lora", "--shapes", "3,10,2,7", "--dtype", "float32",
                  "--sides", "ours,compose,dense", "--rounds", "2", "--batch-ms", "0.5",
                  "--warmup-s", "0", "--quiet", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    # A merged adapter cannot be trained: no dense side in train, and the
    # table keeps its columns.
    assert "| 3, 10, 2, 7 | float32 | train |" in out
    train_row = next(line for line in out.splitlines() if "| train |" in line)
    assert train_row.count("|") == out.splitlines()[2].count("|")
    result = json.loads(path.read_text())
    assert result["op"] == "lora"
    fwd, train = result["results"]
    assert set(fwd["sides"]) == {"ours", "compose", "dense"}
    assert set(train["sides"]) == {"ours", "compose"}
    assert set(train["ratios"]) == {"compose"}
    assert fwd["ours_gflops"] > 0 and fwd["ours_gbs"] > 0


@pytest.mark.parametrize("op", ["lora", "dora"])
@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_lora_sides_compute_the_same_thing(mode, op):
    shape = (5, 12, 3, 9)
    calls = bench.build_calls(shape, torch.float64, "cpu", mode, ["ours", "compose", "dense"],
                              copies=1, op=op)
    if mode == "fwd":
        with torch.no_grad():
            outs = [calls[s]() for s in ("ours", "compose", "dense")]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0])
    else:
        assert set(calls) == {"ours", "compose"}
        grads_ours, grads_compose = calls["ours"](), calls["compose"]()
        # x, A and B (and DoRA's magnitude); W and bias stay frozen
        assert len(grads_ours) == (3 if op == "lora" else 4)
        for a, b in zip(grads_ours, grads_compose):
            torch.testing.assert_close(a, b)


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="op must be one of lowrank, lora, dora"):
        bench.build_calls((1, 2, 1, 2), torch.float32, "cpu", "fwd", ["ours"], 1, op="vera")


def test_bad_arguments_make_no_output_directory(tmp_path, capsys):
    target = tmp_path / "new" / "b.json"
    assert run_cli(["--shapes", "1,2,3", "--json", str(target)]) == 1
    assert "bad shape" in capsys.readouterr().err and not target.parent.exists()


def test_noisy_sides_are_named():
    timing = dict(median_us=10.0, min_us=5.0, max_us=50.0)
    calm = dict(median_us=10.0, min_us=9.0, max_us=12.0)
    result = {"results": [{"shape": {"M": 1, "k": 8, "r": 2, "d": 8}, "dtype": "float32",
                           "mode": "fwd", "sides": {"ours": calm, "compose": timing}}]}
    assert bench.noisy_entries(result) == ["1,8,2,8 float32 fwd compose"]


@pytest.mark.parametrize("argv, message", [
    (["--warmup-s", "inf"], "--warmup-s must be finite and >= 0, got inf"),
    (["--warmup-s", "nan"], "--warmup-s must be finite and >= 0, got nan"),
    (["--batch-ms", "inf"], "--batch-ms must be finite and > 0, got inf"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "100000"], f"--threads must be at most {bench.MAX_THREADS}, got 100000"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
])
def test_bad_timing_settings_are_named_before_any_output_or_timing(argv, message, tmp_path,
                                                                   capsys, monkeypatch):
    # An infinite warmup never ended; --threads 0 failed in torch's words,
    # after the output directory was made.
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    target = tmp_path / "new" / "b.json"
    assert run_cli(["--shapes", "1,4,2,4", "--json", str(target)] + argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"lowrank_ext bench: error: {message}"
    assert not timed and not target.parent.exists()


def test_run_benchmark_rejects_an_endless_warmup(monkeypatch):
    def endless(*args, **kwargs):
        raise AssertionError("the timing started: its warmup would never end")

    monkeypatch.setattr(bench, "_measure", endless)
    with pytest.raises(ValueError, match="^warmup_s must be finite and >= 0, got inf$"):
        bench.run_benchmark([(1, 4, 2, 4)], ["float32"], modes=["fwd"], sides=["ours"],
                            warmup_s=float("inf"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_an_output_directory_that_takes_no_file_fails_before_any_timing(capsys, monkeypatch):
    # /proc exists and (for root) passes permission checks, but no file can be
    # created there: the write would have failed only after the timing.
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    for flag in ("--json", "--markdown"):
        assert run_cli(["--shapes", "1,4,2,4", flag, "/proc/b.out"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"lowrank_ext bench: error: {flag}: cannot write /proc/b.out: "
                              "cannot create a file in /proc") and err.count("\n") == 0
    assert not timed


def test_the_recorded_command_pastes_back_into_a_shell(monkeypatch):
    import shlex

    argv = ["bench", "--shapes", "1,4,2,4;2,8,2,8", "--json", "my results.json"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/lowrank_ext/__main__.py"] + argv)
    assert shlex.split(bench.command_line()) == ["python", "-m", "lowrank_ext"] + argv


def _no_matplotlib(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)


@pytest.mark.parametrize("case", ["format", "no matplotlib", "timing fails"])
def test_a_failing_bench_leaves_no_directory_it_made(case, tmp_path, capsys, monkeypatch):
    # The --json / --markdown / --plot directories were made first, and
    # stayed when a later check (or the timing) failed.
    timed = []

    def failing(*args, **kwargs):
        timed.append(1)
        raise RuntimeError("the timing failed")

    monkeypatch.setattr(bench, "run_benchmark", failing)
    argv = ["--shapes", "1,4,2,4", "--json", str(tmp_path / "j" / "deep" / "b.json"),
            "--markdown", str(tmp_path / "m" / "b.md")]
    if case == "format":
        pytest.importorskip("matplotlib")
        argv += ["--plot", str(tmp_path / "p" / "b.xyz")]
        message = "matplotlib cannot write 'xyz' images"
    elif case == "no matplotlib":
        _no_matplotlib(monkeypatch)
        argv += ["--plot", str(tmp_path / "p" / "sub" / "b.png")]
        message = "--plot needs matplotlib"
    else:
        message = "the timing failed"
    assert run_cli(argv) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and len(timed) == (case == "timing fails")


def test_a_failed_output_check_removes_the_directories_made_for_the_others(tmp_path, capsys):
    # --json's directory is made, then --markdown names a directory.
    (tmp_path / "taken").mkdir()
    assert run_cli(["--shapes", "1,4,2,4", "--json", str(tmp_path / "new" / "b.json"),
                    "--markdown", str(tmp_path / "taken")]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


@pytest.mark.parametrize("shapes, message", [
    ("99999999999999999999,64,4,64",
     "--shapes 99999999999999999999,64,4,64: a 99999999999999999999 × 64 tensor"),
    # Each size fits int64, the element count of x·Bᵀ's M × d output does not.
    ("3037000500,4,4,3037000500", "--shapes 3037000500,4,4,3037000500: a 3037000500 × "
                                  "3037000500 tensor"),
])
def test_shapes_no_tensor_could_hold_fail_before_any_timing(shapes, message, capsys,
                                                            monkeypatch, tmp_path):
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    target = tmp_path / "new" / "b.json"
    assert run_cli(["--shapes", f"1,4,2,4;{shapes}", "--json", str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lowrank_ext bench: error: {message}") and err.count("\n") == 0
    assert "more than torch can allocate" in err
    assert not timed and not target.parent.exists()


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_an_empty_output_path_names_its_option(flag, capsys, monkeypatch):
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    assert run_cli(["--shapes", "1,4,2,4", flag, ""]) == 1
    assert capsys.readouterr().err == (f"lowrank_ext bench: error: {flag} is empty; "
                                       "give a file name\n")
    assert not timed


def test_every_sample_starts_where_the_previous_side_stopped(monkeypatch):
    # One position in the input sets for all sides: a side's sample starts on
    # the sets used longest ago, not on those another side has just warmed.
    starts = []

    def side(name):
        def call():
            pass

        call.rotate_to = lambda position: starts.append((name, position))
        return call

    batches = {"ours": 3, "compose": 5}
    monkeypatch.setattr(bench, "_calibrate", lambda time_batch, fn, target: batches[
        next(n for n, c in calls.items() if c is fn)])
    calls = {name: side(name) for name in batches}
    bench.time_sides(calls, lambda fn, n: 1.0, rounds=3, warmup_s=0.0, batch_us=1.0)
    position, expected = 0, []
    for i in range(3):
        for name in (["ours", "compose"] if i % 2 == 0 else ["compose", "ours"]):
            expected.append((name, position))
            position += batches[name]
    assert starts == expected


@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_rotate_to_picks_the_input_set(mode):
    calls = bench.build_calls((3, 8, 2, 5), torch.float64, "cpu", mode, ["ours", "dense"], 3)
    for call in calls.values():
        outputs = []
        for position in (0, 1, 2, 3, 4):
            call.rotate_to(position)
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                out = call()
            outputs.append(out if mode == "fwd" else out[0])
        assert torch.equal(outputs[0], outputs[3]) and torch.equal(outputs[1], outputs[4])
        assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


def test_busy_sides_are_named():
    idle = dict(median_us=10.0, min_us=9.0, max_us=12.0, other_load=0.05)
    busy = dict(idle, other_load=1.0)
    result = {"results": [{"shape": {"M": 4, "k": 64, "r": 8, "d": 64}, "dtype": "float32",
                           "mode": mode, "sides": {"ours": sides, "compose": sides}}
                          for mode, sides in (("fwd", busy), ("train", idle))]}
    assert bench.busy_entries(result) == ["4,64,8,64 float32 fwd"]
    assert bench.noisy_entries(result) == []  # its samples agree: only the other load tells


TINY = ["--shapes", "2,8,2,8", "--dtype", "float32", "--modes", "fwd", "--sides",
        "ours,compose", "--rounds", "1", "--batch-ms", "0.2", "--warmup-s", "0", "--quiet"]


def test_json_to_standard_output_keeps_the_table_off_it(capsys):
    # "--json -" wrote a file named "-"; the JSON is now all of stdout.
    assert run_cli(TINY + ["--json", "-"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["results"][0]["shape"] == {"M": 2, "k": 8, "r": 2, "d": 8}
    assert "compose / ours" in err


def test_markdown_to_standard_output(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(TINY + ["--markdown", "-"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Command: `") and "compose / ours" in out
    assert "Machine:" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--json", "-", "--markdown", "-"], "--json and --markdown both name standard output (-)"),
    (["--plot", "-"], "--plot -: an image does not go to standard output"),
    (["--shapes", ""], "--shapes: no shapes given"),
    (["--dtype", ","], "--dtype: no dtypes given"),
    (["--modes", "fwd,back"], "--modes: bad value 'back'; choose from fwd, train"),
    (["--sides", "ours,slow"], "--sides: bad value 'slow'"),
    (["--op", "lora", "--modes", "train", "--sides", "ours,dense"],
     "--sides dense: --op lora has no dense side in train"),
    (["--sides", "ours", "--plot", "b.png"], "--plot draws the ratios to the other sides"),
    (["--warmup-s", "1e300"], "--warmup-s must be at most 3600, got 1e+300"),
    (["--batch-ms", "1e9"], "--batch-ms must be at most 60000, got 1e+09"),
])
def test_refused_options_are_named_before_any_timing(argv, message, capsys, tmp_path,
                                                     monkeypatch):
    if "--plot" in argv and "-" not in argv:
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    args = argv if "--shapes" in argv else ["--shapes", "2,8,2,8"] + argv
    assert run_cli(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowrank_ext bench: error: ") and message in err
    assert err.count("\n") == 0 and not timed and list(tmp_path.iterdir()) == []


def test_a_dtype_named_twice_is_timed_once():
    assert bench.parse_dtypes("float32,fp32,bf16,bfloat16") == ["float32", "bfloat16"]


def test_repeated_sides_and_modes_are_timed_once(capsys):
    assert run_cli(TINY[:4] + ["--modes", "fwd,fwd", "--sides", "ours,compose,compose",
                                 "--rounds", "1", "--batch-ms", "0.2", "--warmup-s", "0",
                                 "--quiet", "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["results"]) == 1
    assert result["settings"]["sides"] == ["ours", "compose"]


def test_an_output_under_a_file_names_the_file(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    assert run_cli(["--shapes", "2,8,2,8", "--json", str(tmp_path / "f" / "x.json")]) == 1
    err = capsys.readouterr().err
    assert f"--json: cannot write {tmp_path / 'f' / 'x.json'}: {tmp_path / 'f'} is not a " \
           "directory" in err


class _GoneReader:
    """A standard output whose reader has gone away (`| head -1`)."""
    encoding = "utf-8"

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise ValueError("no descriptor")


def test_output_files_are_written_before_the_table_is_printed(tmp_path, monkeypatch):
    # The table went first, so a reader gone away lost the whole run's files.
    monkeypatch.setattr(sys, "stdout", _GoneReader())
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    assert run_cli(TINY + ["--json", str(js), "--markdown", str(md)]) == 1
    assert json.loads(js.read_text())["results"] and "compose / ours" in md.read_text()


def test_a_failed_output_leaves_the_old_files(tmp_path, capsys, monkeypatch):
    # Plain open("w") emptied the old file before the failure.
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    js.write_text("old")

    def failing_plot(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(bench, "plot", failing_plot)
    assert run_cli(TINY + ["--json", str(js), "--plot", str(png)]) == 1
    assert "the plot failed" in capsys.readouterr().err
    assert js.read_text() == "old" and not png.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_an_output_given_as_a_link_is_written_where_it_points(tmp_path, capsys, monkeypatch):
    # The link stays and its target gets the file, as open() did before the
    # writes became atomic (a rename would have replaced the link itself).
    target = tmp_path / "runs" / "2026.json"
    target.parent.mkdir()
    target.write_text('{"old": 1}')
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    assert run_cli(TINY + ["--json", str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())["results"]
    # A link to a file not made yet, in an existing directory: made there.
    fresh = tmp_path / "fresh.json"
    fresh.symlink_to(tmp_path / "runs" / "new.json")
    assert run_cli(TINY + ["--json", str(fresh)]) == 0
    assert fresh.is_symlink() and json.loads(fresh.read_text())["results"]
    # Into a directory that does not exist: refused before any timing (it
    # failed after the timing).
    capsys.readouterr()
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "missing" / "out.json")
    assert run_cli(TINY + ["--json", str(dangling)]) == 1
    err = capsys.readouterr().err
    assert "--json: cannot write" in err and "in a directory that does not exist" in err
    assert not timed and not (tmp_path / "missing").exists()


def test_a_failed_write_still_shows_the_figures(tmp_path, capsys, monkeypatch):
    # Written before the table is printed, a failed file (a full disk) lost
    # the whole run's figures.
    from lowrank_ext import files

    def full_disk(written, owner=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "atomic_write_files", full_disk)
    assert run_cli(TINY + ["--json", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err
    assert "compose / ours" in err and "No space left on device" in err


def test_main_leaves_the_callers_streams_as_they_were(monkeypatch):
    import io

    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    monkeypatch.setattr(sys, "stderr", None)
    assert cli.main(["info"]) == 0
    assert sys.stdout.errors == "strict" and sys.stderr is None


def test_json_to_a_closed_standard_output_fails_before_any_timing(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", None)
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    assert run_cli(TINY + ["--json", "-"]) == 1
    assert "--json -: standard output is closed" in capsys.readouterr().err and not timed


def test_markdown_to_standard_output_has_the_bytes_of_the_file(monkeypatch, tmp_path, capsys):
    # An ASCII standard output got µ and × escaped as \xb5 and \xd7 where
    # the file has them in UTF-8.
    import io

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    assert run_cli(TINY + ["--markdown", "-"]) == 0
    piped = raw.getvalue().decode("utf-8")
    assert run_cli(TINY + ["--markdown", str(tmp_path / "b.md")]) == 0
    assert "µs" in piped and "×" in piped and "\\x" not in piped
    assert piped.splitlines()[4:6] == (tmp_path / "b.md").read_text("utf-8").splitlines()[4:6]


def test_a_shape_given_twice_is_timed_once():
    assert bench.parse_shapes("4,8,2,8;4x8x2x8;1,2,3,4;4,8,2,8") == [(4, 8, 2, 8), (1, 2, 3, 4)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/dev/stdout and /proc")
@pytest.mark.parametrize("name", ["/dev/stdout", "/dev/fd/1", "link"])
@pytest.mark.parametrize("into", ["pipe", "file"])
def test_json_to_dev_stdout_is_written_into_the_stream(into, name, tmp_path):
    # /dev/stdout links to /proc/self/fd/1: into a pipe that was refused
    # ("cannot create a file in /proc/.../fd"); into a file redirected by the
    # shell, the file was replaced (or, opened anew, written from its start),
    # and what came before and after the JSON was lost. /dev/fd/1 was refused,
    # and a link to /dev/stdout wrote over the file.
    import shlex
    import subprocess

    if name == "link":
        name = tmp_path / "out.json"
        name.symlink_to("/dev/stdout")
    cmd = [sys.executable, "-m", "lowrank_ext", "bench"] + TINY + ["--json", str(name)]
    script = f"echo BEFORE; {shlex.join(cmd)}; echo AFTER"
    if into == "pipe":
        out = subprocess.run(["sh", "-c", f"({script}) | cat"], capture_output=True, text=True,
                             check=True).stdout
    else:
        log = tmp_path / "out.txt"
        log.touch()
        inode = log.stat().st_ino
        subprocess.run(["sh", "-c", f"({script}) > '{log}'"], check=True)
        assert log.stat().st_ino == inode
        out = log.read_text("utf-8")
    assert out.startswith("BEFORE\n{") and out.endswith("AFTER\n")
    assert "compose / ours" in out.split("\n}\n")[1]
    json.loads(out[len("BEFORE\n"):out.index("\n}\n") + 3])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/dev/stdout")
def test_json_to_a_closed_dev_stdout_fails_before_any_timing(tmp_path):
    import shlex
    import subprocess

    cmd = [sys.executable, "-m", "lowrank_ext", "bench"] + TINY + ["--json", "/dev/stdout"]
    run = subprocess.run(["sh", "-c", f"{shlex.join(cmd)} >&-"], capture_output=True,
                         text=True)
    assert run.returncode == 1
    assert "--json /dev/stdout: standard output is closed" in run.stderr


def test_two_outputs_naming_one_regular_file_under_dev_are_refused(monkeypatch, capsys):
    # Paths under /dev were all taken for streams: a regular file in /dev/shm
    # named twice was written twice, the JSON lost.
    import os

    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    path = os.path.join(shm, f"lowrank_ext_test_{os.getpid()}.out")
    assert run_cli(TINY + ["--json", path, "--markdown", path]) == 1
    assert "name the same file" in capsys.readouterr().err
    assert not timed and not os.path.exists(path)


def test_a_fraction_past_the_bound_is_named():
    from fractions import Fraction

    with pytest.raises(ValueError, match="^warmup_s must be at most 3600, got 7200$"):
        bench.check_settings(1, Fraction(7200), 20.0, None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a non-UTF-8 file name")
def test_outputs_under_non_utf8_names_in_any_locale(tmp_path, monkeypatch, capsys):
    import os

    directory = os.fsencode(tmp_path)
    md = os.fsdecode(directory + b"/r\xff.md")
    monkeypatch.setattr(sys, "argv", ["lowrank_ext", "bench", "--markdown", md])
    assert run_cli(TINY + ["--markdown", md]) == 0
    data = open(os.fsencode(md), "rb").read()
    # UTF-8 text (µ), the name's byte kept as it was in the command.
    assert "µ".encode() in data and b"r\xff.md" in data


def test_a_stdout_that_cannot_hold_the_table_gets_escapes(monkeypatch, capsys):
    import io

    raw = io.BytesIO()
    ascii_out = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    assert run_cli(TINY) == 0
    ascii_out.flush()
    text = raw.getvalue().decode("ascii")
    assert "ours \\xb5s" in text and "compose / ours" in text


def test_a_shape_the_memory_cannot_hold_is_named(monkeypatch):
    # torch's "DefaultCPUAllocator: can't allocate memory" named no shape.
    def no_memory(shape, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] data. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(bench, "build_calls", no_memory)
    with pytest.raises(RuntimeError, match=r"^shape 4096,4096,64,65536 \(float32\): not enough "
                                           "memory for its inputs \\(.*can't allocate memory"):
        bench.run_benchmark([(4096, 4096, 64, 65536)], ["float32"], modes=["fwd"],
                            sides=["ours"], rounds=1, warmup_s=0)

    def bug(shape, *args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(bench, "build_calls", bug)
    with pytest.raises(RuntimeError, match="^something else$"):
        bench.run_benchmark([(4, 4, 2, 4)], ["float32"], modes=["fwd"], sides=["ours"],
                            rounds=1, warmup_s=0)


def test_an_image_format_matplotlib_cannot_draw_here_is_refused_before_timing(
        capsys, tmp_path, monkeypatch):
    # pgf needs a TeX system: it failed only after the whole run, and the
    # JSON written with it was lost.
    plt = pytest.importorskip("matplotlib.pyplot")
    monkeypatch.chdir(tmp_path)
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    real_savefig = plt.Figure.savefig

    def no_tex(self, fname, *args, format=None, **kwargs):
        if format == "pgf":
            raise RuntimeError("'xelatex' not found")
        return real_savefig(self, fname, *args, format=format, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", no_tex)
    assert run_cli(["--shapes", "2,8,2,8", "--json", "b.json", "--plot", "b.pgf"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("lowrank_ext bench: error: --plot b.pgf: matplotlib cannot write 'pgf' "
                   "images here: 'xelatex' not found")
    assert not timed and list(tmp_path.iterdir()) == []


def test_adapter_ops_train_alone_with_the_default_sides(capsys, tmp_path, monkeypatch):
    # The default sides hold dense, which a trained adapter has not: the run
    # was refused, blaming a --sides the command never gave.
    monkeypatch.chdir(tmp_path)
    for op in ("lora", "dora"):
        argv = ["--op", op, "--modes", "train", "--shapes", "2,8,2,8", "--rounds", "1",
                "--warmup-s", "0", "--batch-ms", "0.1", "--dtype", "float32", "--json", "b.json"]
        assert run_cli(argv) == 0, capsys.readouterr().err
        result = json.loads((tmp_path / "b.json").read_text())
        timed = {side for row in result["results"] for side in row["sides"]}
        assert timed == {"ours", "compose", "compiled"}
        assert run_cli(argv + ["--sides", "ours,dense"]) == 1
        assert "--sides dense: --op " + op in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failed_write_to_a_device_names_the_option_and_path(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.md").write_text("old")
    argv = ["--shapes", "2,8,2,8", "--rounds", "1", "--warmup-s", "0", "--batch-ms", "0.1",
            "--dtype", "float32", "--modes", "fwd", "--sides", "ours,compose",
            "--json", "/dev/full", "--markdown", "keep.md"]
    assert run_cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "lowrank_ext bench: error: --json /dev/full: cannot write: No space left on device"
    assert (tmp_path / "keep.md").read_text() == "old"


def test_a_reader_that_went_away_ends_the_command_quietly(tmp_path):
    # A BrokenPipeError was rewrapped as a plain OSError naming --json: an
    # error message where `bench ... --json /dev/stdout | head` ends quietly.
    import subprocess

    script = ("import os, sys\n"
              "from lowrank_ext import bench_cli\n"
              "r, w = os.pipe(); os.close(r)\n"
              "try:\n"
              "    bench_cli._write_into('--json', f'/dev/fd/{w}', b'x' * 100000)\n"
              "except BrokenPipeError:\n"
              "    print('broken pipe, unchanged')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "broken pipe, unchanged", done.stderr
