"""`crystalc inspect` on .crystal files: both versions load; a malformed file is one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from crystalc.format.crystal import encode_crystal
from tests.conftest import random_graph
from tests.format.corrupt import all_cases
from tests.format.seeds_v2_writer import seeds_v2_bytes
from tests.format.test_seeds_v2 import state

CRYSTALC = os.path.join(os.path.dirname(sys.executable), "crystalc")


def crystalc(*args) -> subprocess.CompletedProcess:
    return subprocess.run([CRYSTALC, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_inspect_reads_both_versions(tmp_path):
    v3 = tmp_path / "v3.crystal"
    v3.write_bytes(encode_crystal(random_graph("three_blocks_n0_n1", seed=1)))
    v2 = tmp_path / "v2.crystal"
    v2.write_bytes(seeds_v2_bytes(state(), n_heads=3, mixed8=True))
    for path, needle in ((v3, "L=3"), (v2, "head(weight=i8/tensor[29, 24]")):
        res = crystalc("inspect", path)
        assert res.returncode == 0, res.stderr
        assert needle in res.stdout.replace("%", "")


@pytest.mark.parametrize("pick", [0, 40, 150, -1])
def test_inspect_malformed_file_is_one_line_exit_2(tmp_path, pick):
    cases = [c for c in all_cases(encode_crystal(random_graph("d40_h5", seed=1))) if c[2]]
    label, data, _ = cases[pick]
    path = tmp_path / "bad.crystal"
    path.write_bytes(data)
    res = crystalc("inspect", path)
    assert res.returncode == 2, label
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
