"""Writing outputs so that a failure never leaves a half-written file or folder, and reading text inputs."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from crystalc.errors import CrystalError

# Errors of the output's file system, not of crystalc: they become one line naming the output.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


# Left in every folder atomic_dir writes: the only kind of non-empty folder it will replace, so that
# `-o` pointed at a folder of the user's own (a home, a project, /tmp) is an error, not a deletion.
OUTPUT_MARK = ".crystalc-output"


# Outputs this process has put in place, for the message of an interrupt that comes after one.
completed: list[Path] = []

# Text inputs (corpora) are read whole: past this, an endless file (/dev/zero) or a mistaken one.
TEXT_LIMIT = 1 << 30


def model_file(path: str | os.PathLike[str]) -> Path:
    """A model's path, which must be a regular file (its readers seek and map it)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CrystalError(f"{path}: no such file") from None
    except OSError as e:  # a name too long, a link loop, a folder on the way that may not be searched
        raise CrystalError(f"{path}: cannot read the model ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise CrystalError(f"{path}: not a regular file (a folder, FIFO or device): give the model's file")
    return Path(path)


# Read in pieces: one read of `limit` bytes would ask for all of it at once, however small the file.
_CHUNK = 1 << 20


def read_text(path: str | os.PathLike[str], what: str = "corpus", limit: int = TEXT_LIMIT) -> str:
    """A UTF-8 text input, whole: a file, or a pipe (<(...)); one CrystalError for anything else."""
    p = Path(path)
    data = bytearray()  # grown in place: a list of pieces joined at the end would hold the text twice
    try:
        with open(p, "rb") as f:
            while len(data) <= limit and (chunk := f.read(min(_CHUNK, limit + 1 - len(data)))):
                data += chunk
    except FileNotFoundError:
        raise CrystalError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise CrystalError(f"{path}: a folder, not a {what} file") from None
    except OSError as e:  # a name too long, a link loop, a folder on the way that may not be searched
        raise CrystalError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > limit:
        raise CrystalError(f"{path}: the {what} is larger than {limit:,} bytes: give a part of it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CrystalError(f"{path}: cannot read the {what} as UTF-8 text ({e})") from None


def _cannot_write(path: Path, e: OSError) -> CrystalError:
    return CrystalError(f"cannot write {path}: {e.strerror or e}")


def _output_path(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.name in ("", ".", ".."):  # "", ".", "/", "..": a folder we must not replace, not an output's name
        raise CrystalError(f"output path {str(path)!r} names no file or folder of its own")
    try:
        # the folder as the kernel will reach it ("new/../kept", "link/.."), once: made, probed and renamed into alike
        out = Path(os.path.realpath(out.parent)) / out.name
        if out.is_symlink():  # the output goes where the link points; renamed over, the link itself would go
            try:
                out = Path(os.path.realpath(out, strict=True))
            except FileNotFoundError:  # a link to a file yet to be written; a loop is an OSError of its own
                out = Path(os.path.realpath(out))
        # an output is renamed into place, which would replace a device or a FIFO (-o /dev/null) with a file
        if out.exists() and not (out.is_file() or out.is_dir()):
            raise CrystalError(f"{out} is not a regular file or folder (a device, FIFO or socket): choose a path to "
                               "write")
    except OSError as e:  # a name too long, a link loop, a folder on the way that may not be searched
        raise _cannot_write(Path(path), e) from None
    return out


def _temp_prefix(name: str, folder: Path) -> str:
    """A temporary sibling's name prefix: the output's name, cut so that prefix, random part and suffix
    (up to 16 bytes) still fit the folder's file system however long the output's own name is."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    keep = max(name_max - 24, 1)
    return "." + name.encode("utf-8", "surrogateescape")[:keep].decode("utf-8", "ignore") + "."


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, not after the work, when `path` could not be written where it is.

    Probes with a temporary file in the nearest folder that exists, removed at once, so
    that a command that fails later leaves no trace (not even a folder it would create).
    """
    out = _output_path(path)
    try:
        folder = out.absolute().parent
        while True:  # up to the nearest that exists; any error but "missing" (a link loop) is the output's
            try:
                mode = os.stat(folder).st_mode
                break
            except (FileNotFoundError, NotADirectoryError):
                folder = folder.parent
        if not stat.S_ISDIR(mode):
            raise CrystalError(f"cannot write {out}: {folder} is a file, not a folder")
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(out.name, folder), suffix=".probe", dir=folder)
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


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p folder; the folders it made, deepest first (removed again if the output fails)."""
    made = []
    f = folder  # (resolved by _output_path: no "..", so walking up meets only folders on the way)
    while not f.exists() and f != f.parent:
        made.append(f)
        f = f.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _remove_made(made: list[Path]) -> None:
    for f in made:
        with suppress(OSError):
            f.rmdir()  # only while empty: another process may have put something there meanwhile


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then act: a swap of outputs is never left half-way
    (the old output moved aside, the new one not yet in its place)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda n, _: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():  # (None: a handler set outside Python, which cannot be put back)
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        first: BaseException | None = None
        for n in dict.fromkeys(caught):  # each signal once, in the order they came, though a handler raises
            try:
                signal.raise_signal(n)
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path`; rename it over `path` only on success."""
    path = _output_path(path)
    made: list[Path] = []
    try:
        made = _make_parents(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name, path.parent), suffix=".tmp", dir=path.parent)
    except OSError as e:
        _remove_made(made)
        raise _cannot_write(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            # mkstemp makes the file private (0600); an output should get the usual permissions, where the
            # file system has any
            with suppress(OSError):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
        with _signals_held():
            _replace(tmp, path)
            completed.append(path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        _remove_made(made)
        if e.errno in _FULL:
            raise _cannot_write(path, e) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        _remove_made(made)
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
    made: list[Path] = []
    try:
        made = _make_parents(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name, path.parent), suffix=".tmp", dir=path.parent))
    except OSError as e:
        _remove_made(made)
        raise _cannot_write(path, e) from None
    try:
        with suppress(OSError):
            os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        (tmp / OUTPUT_MARK).write_text("Written by crystalc. The next crystalc compile to this folder "
                                       "replaces it whole.\n", encoding="utf-8")
        with _signals_held():
            _swap_in(tmp, path)
            completed.append(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        if e.errno in _FULL:
            raise _cannot_write(path, e) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the folder tmp in the place of path, an existing one included."""
    if path.exists():
        # a folder cannot be renamed over a non-empty one: move the old aside, put it back on failure
        try:
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name, path.parent), suffix=".old", dir=path.parent))
        except OSError as e:
            raise _cannot_write(path, e) from None
        try:
            _replace(path, old / "x")
        except CrystalError:
            shutil.rmtree(old, ignore_errors=True)
            raise
        try:
            _replace(tmp, path)
        except CrystalError as e:
            try:
                os.replace(old / "x", path)
            except OSError:  # e.g. another process's output took the place meanwhile
                raise CrystalError(f"{e}; the previous output could not be put back: it is in {old / 'x'}") from None
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        _replace(tmp, path)
