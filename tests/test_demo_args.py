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

