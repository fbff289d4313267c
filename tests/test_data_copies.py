"""tests/data holds copies of the project's shared spec vectors and corpus, so that a clone of the
repository tests on its own; where ../shared sits beside the checkout, the copies must equal it."""

from __future__ import annotations

import pytest

from tests.conftest import CORPUS, SHARED, SPEC_VECTORS


def _require_shared() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not beside the checkout: nothing to compare the copies with")


def test_spec_vectors_are_the_shared_ones() -> None:
    _require_shared()
    originals = SHARED / "spec" / "vectors"
    names = sorted(p.name for p in originals.iterdir())
    assert sorted(p.name for p in SPEC_VECTORS.iterdir()) == names
    for name in names:
        assert (SPEC_VECTORS / name).read_bytes() == (originals / name).read_bytes(), name


def test_corpus_is_the_shared_one() -> None:
    _require_shared()
    assert CORPUS.read_bytes() == (SHARED / "data" / "tinyshakespeare.txt").read_bytes()
