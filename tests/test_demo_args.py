"""The demo command's arguments: bad values are one-line errors naming the option."""

import pytest

from lowrank_ext import cli


@pytest.mark.parametrize("seed", [10**23, 2**64, -2**63 - 1])
def test_a_seed_past_torchs_range_is_named(seed, capsys):
    # torch.manual_seed said "Overflow when unpacking long long", naming nothing.
    assert cli.main(["demo", "--seed", str(seed)]) == 1
    out, err = capsys.readouterr()
    assert err == f"lowrank_ext demo: error: --seed must be in [-2**63, 2**64 - 1], got {seed}\n"
    assert out == ""



def test_the_op_is_checked_against_its_own_factors_not_w(capsys, monkeypatch):
    # `demo --size 1000 --rank 1000`: svd_truncate's float32 factors of an
    # ill-conditioned full-rank W hold it only to about 1e-5, and the demo
    # blamed lowrank_linear for that. Factors 1e-3 off W stand in for them.
    import lowrank_ext

    real = lowrank_ext.svd_truncate
    monkeypatch.setattr(lowrank_ext, "svd_truncate",
                        lambda W, rank: tuple(f * (1 + 1e-3) for f in real(W, rank=rank)))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "equal up to float32 rounding" in out and "DIFFERENT" not in out


def test_a_wrong_op_is_still_caught(capsys, monkeypatch):
    import lowrank_ext

    real = lowrank_ext.lowrank_linear
    monkeypatch.setattr(lowrank_ext, "lowrank_linear",
                        lambda x, A, B, bias: real(x, A, B, bias) * (1 + 1e-4))
    assert cli.main(["demo"]) == 1
    out, err = capsys.readouterr()
    assert "DIFFERENT" in out
    assert err.startswith("lowrank_ext demo: error: lowrank_linear differs from (x·Aᵀ)·Bᵀ + b "
                          "in float64 by ") and err.count("\n") == 1


def test_a_size_past_the_demo_s_limit_is_named_before_any_output(capsys):
    """--size 10**19 overflowed torch.randn after printing, 4·10**9 ran out of memory."""
    assert cli.main(["demo", "--size", str(10**19)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--size must be in [1, 4096], got 10000000000000000000" in captured.err
