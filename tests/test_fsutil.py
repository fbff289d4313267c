"""Outputs are all-or-nothing, and an output that cannot be written is one line of error."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crystalc.errors import CrystalError
from crystalc.fsutil import OUTPUT_MARK, atomic_dir, atomic_file, check_writable
from tests.conftest import REPO, random_graph, save_pt


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


@pytest.mark.parametrize("opener", [atomic_file, atomic_dir])
def test_an_output_through_a_symlink_goes_where_it_points(tmp_path: Path, opener) -> None:
    """Renamed over, the link itself would be replaced (as root, -o /dev/stdout made /dev/stdout a file)."""
    import os

    target = tmp_path / "real" / "out"
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)  # dangling until the output exists
    for _ in range(2):  # a new output, then one replaced
        with opener(link) as f:
            if opener is atomic_file:
                f.write(b"data")
            else:
                (f / "x").write_text("data")
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert target.is_file() if opener is atomic_file else (target / "x").is_file()
    to_device = tmp_path / "null"
    to_device.symlink_to("/dev/null")
    with pytest.raises(CrystalError, match="/dev/null is not a regular file"), opener(to_device):
        pass
    assert to_device.is_symlink()


@pytest.mark.parametrize("opener", [atomic_file, atomic_dir])
def test_folders_made_for_a_failed_output_are_removed(tmp_path: Path, opener) -> None:
    with pytest.raises(ValueError), opener(tmp_path / "new" / "deep" / "out"):
        raise ValueError("the work failed")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """Ctrl-C as Python sets it up: a run started in the background by a shell without job control
    (`make test &`) inherits SIGINT ignored, and Python then leaves it so."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_signals_wait_for_the_swap_and_then_act(tmp_path: Path, ctrl_c: None) -> None:
    """An interrupt during the swap of an existing folder would leave the old one aside and none in place."""
    import os

    import crystalc.fsutil as fsutil

    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "v").write_text("1")
    real = fsutil._swap_in

    def swap_interrupted(tmp: Path, path: Path) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-swap
        real(tmp, path)

    fsutil._swap_in = swap_interrupted
    try:
        with pytest.raises(KeyboardInterrupt), atomic_dir(out) as d:
            (d / "v").write_text("2")
    finally:
        fsutil._swap_in = real
    assert (out / "v").read_text() == "2" and out in fsutil.completed  # whole, and said to be written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_read_text_reads_pipes_and_bounds_the_size(tmp_path: Path) -> None:
    import os

    from crystalc.fsutil import read_text

    r, w = os.pipe()
    os.write(w, b"to be\n")
    os.close(w)
    try:
        assert read_text(f"/dev/fd/{r}") == "to be\n"  # train --data <(...)
    finally:
        os.close(r)
    (tmp_path / "big.txt").write_text("x" * 11)
    with pytest.raises(CrystalError, match="larger than 10 bytes"):
        read_text(tmp_path / "big.txt", limit=10)
    with pytest.raises(CrystalError, match="a folder, not a corpus file"):
        read_text(tmp_path)
    with pytest.raises(CrystalError, match="no such corpus file"):
        read_text(tmp_path / "none")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_cleans_up_as_an_interrupt(tmp_path: Path, name: str) -> None:
    """timeout, docker and systemd stop with SIGTERM: it acts as Ctrl-C, exit 130 and one line.

    train writes only at its end, so the empty folder shows only that nothing was written early; the removal of
    a half-made output under an interrupt is what the atomic_file/atomic_dir interrupt tests above check.
    """
    import time

    # (a SIGINT ignored by whoever started the tests, `make test &`, would be inherited: not here)
    p = subprocess.Popen([sys.executable, "-m", "crystalc.cli", "train", "--data", str(REPO / "README.md"),
                          "--out", str(tmp_path / "m.pt"), "--steps", "100000", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)  # into the steps (torch's import and the model's set-up take a few seconds)
    assert p.poll() is None, p.communicate()
    p.send_signal(getattr(signal, name))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    lines = err.splitlines()  # (an evaluation's line may come first, under --quiet)
    assert lines[-1] == "crystalc: interrupted: nothing written (an existing output is unchanged)", err
    assert "" not in lines, err  # no empty line: nothing echoed a ^C to end (click did, for SIGINT: an audit)
    assert list(tmp_path.iterdir()) == []


def test_a_signal_after_the_work_is_done_changes_nothing(tmp_path: Path) -> None:
    # an audit: a ^C in the interpreter's last moments, the output whole and its path printed, gave a bare 130
    model = save_pt(random_graph("all_on"), tmp_path / "m.pt")
    code = ("import os, signal, sys\n"
            "from crystalc.cli import main\n"
            f"sys.argv = ['crystalc', 'inspect', {str(model)!r}]\n"
            "main()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('exited as main left it')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert res.returncode == 0 and res.stdout.endswith("exited as main left it\n") and not res.stderr, res


def test_unreadable_paths_are_one_line(tmp_path: Path) -> None:
    """A name too long for the file system fails in stat(), before any open: still one CrystalError."""
    from crystalc.fsutil import model_file, read_text

    long = tmp_path / ("x" * 5000)
    with pytest.raises(CrystalError, match="cannot read the corpus"):
        read_text(long)
    with pytest.raises(CrystalError, match="cannot read the model"):
        model_file(long)


def test_read_text_does_not_reserve_its_limit(tmp_path: Path) -> None:
    """Under a memory cap below the 1 GiB limit, a small corpus still reads (no read of limit+1 bytes at once)."""
    (tmp_path / "c.txt").write_text("small " * 300_000)
    code = ("import resource, sys\n"
            "from crystalc.fsutil import read_text\n"
            "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20), resource.RLIM_INFINITY))\n"
            f"print(len(read_text({str(tmp_path / 'c.txt')!r})))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "1800000\n", res.stderr


def test_a_failed_output_keeps_a_folder_reached_through_dotdot(tmp_path: Path) -> None:
    """-o new/../kept/out.bin: kept/ existed (empty) and must survive the failure; new/ is not made."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError), atomic_file(tmp_path / "new" / ".." / "kept" / "out.bin") as f:
        f.write(b"half")
        raise ValueError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    # and on success the output is where the kernel resolves the path, whether or not new/ exists
    for via in ("new", "kept"):
        out = tmp_path / via / ".." / "kept" / f"{via}.bin"
        check_writable(out)
        with atomic_file(out) as f:
            f.write(b"whole")
        with atomic_dir(tmp_path / via / ".." / "kept" / f"{via}.d") as d:
            (d / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["kept.bin", "kept.d", "new.bin", "new.d"]


def test_every_signal_held_during_a_swap_is_delivered(tmp_path: Path, ctrl_c: None) -> None:
    import os

    from crystalc import fsutil

    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda n, _: seen.append(n))
    real = fsutil._swap_in

    def swap_twice_interrupted(tmp: Path, path: Path) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        real(tmp, path)

    fsutil._swap_in = swap_twice_interrupted
    try:
        with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "out") as d:
            (d / "v").write_text("1")
    finally:
        fsutil._swap_in = real
        signal.signal(signal.SIGTERM, old)
    assert seen == [signal.SIGTERM] and (tmp_path / "out" / "v").read_text() == "1"


def test_link_loops_and_long_names_are_one_line(tmp_path: Path) -> None:
    from crystalc.fsutil import check_writable, model_file, read_text

    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    with pytest.raises(CrystalError, match="cannot write .*loop1: Too many levels of symbolic links"):
        check_writable(tmp_path / "loop1")
    with pytest.raises(CrystalError, match="Too many levels of symbolic links"):  # a loop on the way, found early
        check_writable(tmp_path / "loop1" / "sub" / "out.bin")
    with pytest.raises(CrystalError, match="cannot write"), atomic_file(tmp_path / "loop1"):
        pass
    with pytest.raises(CrystalError, match="cannot read the corpus .*symbolic links"):
        read_text(tmp_path / "loop1")
    with pytest.raises(CrystalError, match="cannot read the model .*symbolic links"):
        model_file(tmp_path / "loop1")
    with pytest.raises(CrystalError, match="File name too long"):
        check_writable(tmp_path / ("a" * 300))
    # a name the file system takes (up to 255 bytes) is written, though its temporary sibling's would not be
    for name in ("b" * 255, "é" * 127):
        check_writable(tmp_path / name)
        with atomic_file(tmp_path / name) as f:
            f.write(b"x")
        with atomic_dir(tmp_path / (name[:-1] + "d")) as d:
            (d / "f").write_text("y")
        with atomic_dir(tmp_path / (name[:-1] + "d")) as d:  # replacing an existing output: moved aside first
            (d / "f").write_text("z")
        assert (tmp_path / name).read_bytes() == b"x" and (tmp_path / (name[:-1] + "d") / "f").read_text() == "z"
    assert len(list(tmp_path.iterdir())) == 6
