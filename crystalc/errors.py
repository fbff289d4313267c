"""The one exception the toolchain raises for bad input.

The CLI turns it into one line on stderr and exit status 2; anything else that
escapes is a bug in crystalc, not in the user's file.
"""


class CrystalError(Exception):
    """Bad input: a malformed file, an inconsistent shape, an unknown option."""
