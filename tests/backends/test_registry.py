"""BACKENDS is the one table of targets: the command line's choices, help and per-target options follow it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from crystalc.backends import BACKENDS, get_backend
from crystalc.cli import compile as compile_command

# a value for each per-target option of `compile`, as it is typed
TYPED = {"cflags": ["--cflags", "-O2"], "lanes": ["--lanes", "2"], "frozen_only": ["--frozen-only"]}


def test_every_target_is_a_backend_of_its_name() -> None:
    for name in BACKENDS:
        assert get_backend(name).name == name


def test_per_target_options_are_compile_options_and_refused_elsewhere(tmp_path: Path) -> None:
    params = {p.name for p in compile_command.params}
    owned = [(opt, name) for name, t in BACKENDS.items() for opt in t.options]
    assert {opt for opt, _ in owned} == set(TYPED)  # a new per-target option gets a line above
    for opt, owner in owned:
        assert opt in params, opt
        for target in BACKENDS:
            if target == owner:
                continue
            r = subprocess.run([sys.executable, "-m", "crystalc.cli", "compile", "m.pt", "-t", target, *TYPED[opt],
                                "-o", "out"], capture_output=True, text=True, cwd=tmp_path)
            flag = TYPED[opt][0]
            assert r.returncode == 2 and r.stderr == (f"crystalc: error: {flag} applies to --target {owner} only, "
                                                      f"not {target}\n"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_template_folder_ships() -> None:
    # setuptools wants each data folder named as a package with its file patterns: a target's templates
    # missing there would work from this checkout and be absent from an installed wheel
    import tomllib

    root = Path(__file__).resolve().parents[2]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in sorted(p for p in (root / "templates").iterdir() if p.is_dir() and p.name != "__pycache__"):
        package = f"crystalc.templates.{folder.name}"
        assert package in setup["packages"], package
        patterns = setup["package-data"][package]
        for f in folder.iterdir():
            if f.is_file():
                assert any(f.match(p) for p in patterns), f"{f.name} is not shipped ({package}: {patterns})"
