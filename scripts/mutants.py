"""Check that the tests can fail: apply each mutation of scripts/mutants.txt, run the tests named for it,
and report the mutants no test kills. Slow (a pytest run per mutant); not part of `make test`.

    .venv/bin/python scripts/mutants.py                 # every mutant
    .venv/bin/python scripts/mutants.py sampler crc     # those whose line mentions a word

A line of mutants.txt is `file | original | mutated | tests`, fields separated by ` | `; the original
text must occur in the file (its first occurrence is replaced). Each file is restored after its run,
and a file with uncommitted changes is refused, so nothing of yours can be lost.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIST = REPO / "scripts" / "mutants.txt"


def mutants(words: list[str]) -> list[tuple[str, str, str, str]]:
    out = []
    for n, line in enumerate(LIST.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(" | ")
        if len(parts) != 4:
            sys.exit(f"{LIST}:{n}: expected 'file | original | mutated | tests'")
        if not words or any(w in line for w in words):
            out.append((parts[0], parts[1], parts[2], parts[3]))
    return out


def run(file: str, original: str, mutated: str, tests: str) -> bool:
    """True when a test fails on the mutant (it is killed)."""
    path = REPO / file
    if subprocess.run(["git", "diff", "--quiet", "--", file], cwd=REPO).returncode:
        sys.exit(f"{file} has uncommitted changes: commit or stash them first")
    text = path.read_text(encoding="utf-8")
    if original not in text:
        sys.exit(f"{file}: the original text is gone: {original!r} (update scripts/mutants.txt)")
    try:
        path.write_text(text.replace(original, mutated, 1), encoding="utf-8")
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *shlex.split(tests)]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    finally:
        path.write_text(text, encoding="utf-8")
    # pytest's 1 is a failed test and 2 a collection error (the mutant broke an import); 5 is no test selected
    # and 4 a bad command line, which say nothing of the mutant and would otherwise count as kills
    if res.returncode in (4, 5):
        sys.exit(f"{file}: {tests!r} runs no tests (pytest exit {res.returncode}): fix scripts/mutants.txt")
    return res.returncode != 0


def main() -> None:
    todo = mutants(sys.argv[1:])
    survivors = []
    for i, (file, original, mutated, tests) in enumerate(todo, 1):
        killed = run(file, original, mutated, tests)
        print(f"[{i}/{len(todo)}] {'killed  ' if killed else 'SURVIVED'} {file}: {original.strip()!r}", flush=True)
        if not killed:
            survivors.append((file, original))
    print(f"{len(todo) - len(survivors)} of {len(todo)} mutants killed")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
