"""scripts/mutants.txt stays runnable: every mutant's original text is still in its file (a stale line stops
`make mutants` at that line, and the mutants after it never run)."""

from pathlib import Path

from tests.conftest import REPO


def test_every_mutant_names_text_its_file_holds() -> None:
    stale = []
    for n, line in enumerate((REPO / "scripts" / "mutants.txt").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        file, original, mutated, tests = line.split(" | ")
        assert original != mutated and tests.strip(), f"line {n}: no mutation, or no tests"
        if original not in Path(REPO / file).read_text(encoding="utf-8"):
            stale.append(f"line {n}: {file}: {original.strip()!r}")
    assert not stale, "\n".join(stale)
