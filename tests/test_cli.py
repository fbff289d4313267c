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
