"""templates/c/unicode_classes.h, the C encoder's classes of GPT-2's pattern, against the tokenizers library
it was generated from (scripts/unicode_classes.py): every range's ends and their neighbours, and a stride
through every plane."""

import re
from pathlib import Path

from tokenizers.pre_tokenizers import ByteLevel

HEADER = Path(__file__).parents[1] / "templates" / "c" / "unicode_classes.h"


def library_class(cp: int) -> str:
    """'L', 'N', 'S' or 'O' as the library splits: a character continues a run only of its own class."""
    pieces = ByteLevel(add_prefix_space=False, use_regex=True)
    for probe, cls in (("a", "L"), ("1", "N"), ("!", "O")):
        if len(pieces.pre_tokenize_str(probe + chr(cp))) == 1:
            return cls
    assert len(pieces.pre_tokenize_str("a" + chr(cp) + chr(cp))) == 2  # a space: a run of its own
    return "S"


def table() -> list[tuple[int, int, str]]:
    rows = [(int(a, 16), int(b, 16), c) for a, b, c in
            re.findall(r"\{0x([0-9a-f]+), 0x([0-9a-f]+), '([LNS])'\}", HEADER.read_text())]
    assert f"unicode_classes[{len(rows)}]" in HEADER.read_text()
    return rows


def header_class(rows: list[tuple[int, int, str]], cp: int) -> str:
    return next((c for a, b, c in rows if a <= cp <= b), "O")


def test_the_ranges_are_ordered_and_apart():
    rows = table()
    assert rows and all(a <= b for a, b, _ in rows)
    # ordered for the binary search; adjacent ranges of one class would be one
    assert all(b0 < a1 and (b0 + 1 < a1 or c0 != c1) for (_, b0, c0), (a1, _, c1) in zip(rows, rows[1:], strict=False))
    assert rows[-1][1] <= 0x10FFFF


def test_the_header_classes_are_the_library_s():
    rows = table()
    points = {p for a, b, _ in rows for p in (a - 1, a, b, b + 1)}
    points |= set(range(0, 0x110000, 97)) | set(range(0x80))
    points = sorted(p for p in points if 0 <= p < 0x110000 and not 0xD800 <= p <= 0xDFFF)
    wrong = [hex(p) for p in points if header_class(rows, p) != library_class(p)]
    assert not wrong, f"{len(wrong)} differ, from {wrong[:10]}: run scripts/unicode_classes.py"
