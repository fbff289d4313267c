"""Argument parsing of the command line that no single command's tests own."""

from __future__ import annotations

import pytest

from crystalc.cli import _parse_ids
from crystalc.errors import CrystalError


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
