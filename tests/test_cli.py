"""Argument parsing of the command line that no single command's tests own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crystalc.cli import _parse_ids
from crystalc.errors import CrystalError
from crystalc.tokenizer import Tokenizer
from tests.conftest import random_graph, save_pt


def test_ids_are_comma_separated_and_spaces_only_pad_them() -> None:
    assert _parse_ids("1, 2 ,3") == [1, 2, 3]
    assert _parse_ids("-1") == [-1]  # left for the range check, which names the id
    for bad in ("1 2", "1,,2", "", "1,", "x", "١"):  # "1 2" is two ids or a typo, never 12; "١": not ASCII
        with pytest.raises(CrystalError, match="comma-separated integers"):
            _parse_ids(bad)


def test_an_id_of_thousands_of_digits_is_one_line() -> None:
    # int() refuses past 4,300 digits: an audit's traceback, through prune-vocab --keep and run --prompt-ids
    assert _parse_ids("0" * 30 + "7") == [7]
    for bad in ("9" * 5000, "1," + "9" * 20, "-" + "9" * 20):
        with pytest.raises(CrystalError, match="at most 19 digits, got one of 20|got one of 5000"):
            _parse_ids(bad)


def test_a_full_stdout_is_one_line(tmp_path: Path) -> None:
    # an audit: `crystalc inspect m.pt > /dev/full` (and eval, quantize's report, simulate) ended in a traceback
    model = save_pt(random_graph("all_on"), tmp_path / "m.pt")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "crystalc.cli", "inspect", str(model)], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "crystalc: error: writing the output: No space left on device\n"


def test_invalid_utf_8_is_named_as_its_bytes() -> None:
    # an audit: `--prompt-ids $'1,\xff'` and simulate's `--prompt $'\xff'` said '\udcff', Python's stand-in
    with pytest.raises(CrystalError, match=r"^token ids must be comma-separated integers, got '1,\\xff'$"):
        _parse_ids("1,\udcff")
    tok = Tokenizer({"kind": "char", "chars": "ab"})
    with pytest.raises(CrystalError, match=r"^the text is not valid UTF-8 \(byte 0xff at character 1\)$"):
        tok.encode("a\udcffb")


def test_a_missing_calibration_text_is_called_so(tmp_path: Path) -> None:
    model = save_pt(random_graph("all_on"), tmp_path / "m.pt")
    r = subprocess.run([sys.executable, "-m", "crystalc.cli", "quantize", str(model), "--int8", "--calibrate",
                        str(tmp_path / "missing.txt"), "-o", str(tmp_path / "q.crystal")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.endswith("missing.txt: no such calibration text file\n"), r.stderr
