"""Outputs are all-or-nothing, and an output that cannot be written is one line of error."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from crystalc.errors import CrystalError
from crystalc.fsutil import OUTPUT_MARK, atomic_dir, atomic_file
from tests.conftest import REPO


def test_atomic_file_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "a.bin"
    out.write_bytes(b"old")
    with pytest.raises(ValueError), atomic_file(out) as f:
        f.write(b"half")
        raise ValueError("crash mid-write")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    with atomic_file(out) as f:
        f.write(b"new")
    assert out.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "keep").write_text("old")
    with pytest.raises(ValueError), atomic_dir(out) as d:
        (d / "new").write_text("half")
        raise ValueError("crash mid-write")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARK, "keep"]
    with atomic_dir(out) as d:
        (d / "new").write_text("whole")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARK, "new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_never_replaces_a_folder_it_did_not_write(tmp_path: Path) -> None:
    """`compile -o ~/project` must not delete the project: only empty folders and earlier outputs are replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(CrystalError, match="already holds files crystalc did not write"), atomic_dir(mine):
        pass
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as d:
        (d / "new").write_text("x")
    assert sorted(p.name for p in empty.iterdir()) == [OUTPUT_MARK, "new"]
    (tmp_path / "file").write_text("")
    with pytest.raises(CrystalError, match="is a file"), atomic_dir(tmp_path / "file"):
        pass


@pytest.mark.parametrize("opener", [atomic_file, atomic_dir])
def test_unwritable_output_is_a_crystal_error(tmp_path: Path, opener) -> None:
    # A regular file where a folder should be: no permission bits involved, so it holds as root too.
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CrystalError, match=r"cannot write .*file/out"), opener(blocker / "out"):
        pass


def test_full_disk_mid_write_is_a_crystal_error_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a.bin"
    with pytest.raises(CrystalError, match="cannot write .*a.bin: No space left"), atomic_file(out) as f:
        f.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["quantize", "{model}", "--int8", "-o", "{blocker}/x.crystal"],
    ["compile", "{model}", "--target", "c", "-o", "{blocker}/out"],
])
def test_cli_unwritable_output_one_line(tmp_path: Path, args: list[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    model = REPO / "examples" / "shakespeare" / "model.pt"
    r = subprocess.run([sys.executable, "-m", "crystalc.cli",
                        *(a.format(model=model, blocker=blocker) for a in args)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("crystalc: error: cannot write "), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("opener", [atomic_file, atomic_dir])
def test_a_device_or_fifo_is_not_replaced(tmp_path: Path, opener) -> None:
    """An output is renamed into place, which would swap /dev/null (or a FIFO) for a file: refused."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special in (fifo, Path("/dev/null")):
        with pytest.raises(CrystalError, match="is not a regular file"):
            with opener(special):
                pass
        assert not special.is_file()


def test_cli_checks_the_output_before_the_work(tmp_path: Path) -> None:
    """train fails at once on an output it could not write, not after training; nothing is left behind."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, "-m", "crystalc.cli", "train", "--data", str(REPO / "README.md"),
                        "--out", str(blocker / "sub" / "m.pt"), "--steps", "100000", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file, not a folder" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "crystalc.cli", "quantize", str(REPO / "examples/shakespeare/model.pt"),
                        "--int8", "-o", "/dev/null"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "/dev/null is not a regular file" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("opener", [atomic_file, atomic_dir])
@pytest.mark.parametrize("name", ["", ".", "..", "/"])
def test_a_path_that_names_no_output_is_refused(tmp_path: Path, monkeypatch, opener, name: str) -> None:
    """`-o ""` is the current folder: replacing it would move the user's working folder away (found by fuzzing)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("mine")
    with pytest.raises(CrystalError, match="names no file or folder of its own"), opener(name):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "keep").write_text("old")
    import crystalc.fsutil as fsutil

    real = fsutil.os.replace

    def flaky(src, dst):
        if Path(dst) == out and Path(src).name.endswith(".tmp"):  # the new folder's rename into place fails
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)

    with pytest.raises(CrystalError, match="cannot write"):
        with atomic_dir(out) as d:
            (d / "new").write_text("new")
            monkeypatch.setattr(fsutil.os, "replace", flaky)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARK, "keep"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
