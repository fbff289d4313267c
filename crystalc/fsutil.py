"""Writing outputs so that a failure never leaves a half-written file or folder."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from crystalc.errors import CrystalError

# Errors of the output's file system, not of crystalc: they become one line naming the output.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


# Left in every folder atomic_dir writes: the only kind of non-empty folder it will replace, so that
# `-o` pointed at a folder of the user's own (a home, a project, /tmp) is an error, not a deletion.
OUTPUT_MARK = ".crystalc-output"


def _cannot_write(path: Path, e: OSError) -> CrystalError:
    return CrystalError(f"cannot write {path}: {e.strerror or e}")


def _output_path(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.name in ("", ".", ".."):  # "", ".", "/", "..": a folder we must not replace, not an output's name
        raise CrystalError(f"output path {str(path)!r} names no file or folder of its own")
    # an output is renamed into place, which would replace a device or a FIFO (-o /dev/null) with a file
    if out.exists() and not (out.is_file() or out.is_dir()):
        raise CrystalError(f"{out} is not a regular file (a device, FIFO or socket): choose a file to write")
    return out


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, not after the work, when `path` could not be written where it is.

    Probes with a temporary file in the nearest folder that exists, removed at once, so
    that a command that fails later leaves no trace (not even a folder it would create).
    """
    out = _output_path(path)
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise CrystalError(f"cannot write {out}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise _cannot_write(out, e) from None
    os.close(fd)
    os.unlink(probe)


def _replace(tmp: str | Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:  # whatever the reason, it is about the output
        raise _cannot_write(path, e) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path`; rename it over `path` only on success."""
    path = _output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    # mkstemp makes the file private (0600); an output should get the usual permissions.
    os.fchmod(fd, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        _replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in _FULL:
            raise _cannot_write(path, e) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `path` only on success.

    An existing `path` is replaced only when it is empty or was written here before
    (it holds OUTPUT_MARK).
    """
    path = _output_path(path)
    if path.exists():
        if not path.is_dir():
            raise CrystalError(f"{path} is a file, not an output folder")
        if any(path.iterdir()) and not (path / OUTPUT_MARK).is_file():
            raise CrystalError(f"{path} already holds files crystalc did not write: remove them, or choose "
                               "another output folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _cannot_write(path, e) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        (tmp / OUTPUT_MARK).write_text("Written by crystalc. The next crystalc compile to this folder "
                                       "replaces it whole.\n", encoding="utf-8")
        if path.exists():
            # a folder cannot be renamed over a non-empty one: move the old aside, put it back on failure
            try:
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            except OSError as e:
                raise _cannot_write(path, e) from None
            _replace(path, old / "x")
            try:
                _replace(tmp, path)
            except CrystalError:
                os.replace(old / "x", path)  # should this fail too, the previous output stays in `old`
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            _replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _FULL:
            raise _cannot_write(path, e) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
