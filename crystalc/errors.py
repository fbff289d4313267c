"""The one exception the toolchain raises for bad input.

The CLI turns it into one line on stderr and exit status 2; anything else that
escapes is a bug in crystalc, not in the user's file.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """`text` with every unprintable character escaped, so that names read from a file cannot break the line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class CrystalError(Exception):
    """Bad input: a malformed file, an inconsistent shape, an unknown option."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))
