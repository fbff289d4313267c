"""The portable C runtime: built once with the system C compiler, cached, and run on a .crystal file.

The runtime is templates/runtime/crystal_runtime.c (the .crystal loader and main)
compiled together with the forward pass and command line that the generated C
shares (templates/c/). The binary is cached under $CRYSTALC_CACHE (default
~/.cache/crystalc), keyed by the crystalc version, the compiler, its flags and a
hash of every source, so an edited source or a new version rebuilds it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from crystalc import __version__
from crystalc.errors import CrystalError

# Portable flags (no -march: the cache may outlive the CPU it was built on). As in the generated
# Makefile: no fused multiply-add, so dequantisation rounds as the interpreter does, and no errno
# from sqrtf, so it vectorises.
CFLAGS = ("-std=c11", "-O3", "-ffp-contract=off", "-fno-math-errno")
# The sanitized build (the tests) also forces the int8 byte-dot-product paths, which a portable
# build leaves to CPUs with AVX-512 VNNI, so that their plain C loop runs under ASan and UBSan too.
SANITIZE_CFLAGS = ("-std=c11", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=all", "-DCRYSTAL_BYTE_DOT=1")
# The files of templates/c/ that the runtime links: the shared forward pass and command line.
SHARED_C = ("crystal_forward.c", "crystal_cli.c")


def templates_dir() -> Path:
    return Path(str(files("crystalc.templates")))


def runtime_sources(loader_only: bool = False) -> list[Path]:
    """The C files of the runtime (or of the loader-only check program), in build order."""
    root = templates_dir()
    srcs = [root / "runtime" / "crystal_runtime.c"]
    if not loader_only:
        shared = [root / "c" / name for name in SHARED_C]
        missing = [p.name for p in shared if not p.is_file()]
        if missing:
            raise CrystalError(f"the portable runtime needs templates/c/{missing[0]}, which this crystalc lacks")
        srcs += shared
    return srcs


def cache_dir() -> Path:
    root = os.environ.get("CRYSTALC_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "crystalc"


def compiler() -> list[str]:
    """$CC as make takes it: a command and maybe its own flags (CC="gcc -m64", CC="ccache cc")."""
    try:
        cc = shlex.split(os.environ.get("CC", "cc"))
    except ValueError as e:
        raise CrystalError(f"CC={os.environ['CC']!r} is not a command line ({e})") from None
    if not cc or shutil.which(cc[0]) is None:
        raise CrystalError(f"no C compiler: '{cc[0] if cc else ''}' is not on PATH (install gcc, or set CC)")
    from crystalc.backends.c import UNSAFE_CFLAGS

    unsafe = [flag for flag in cc[1:] if flag in UNSAFE_CFLAGS]
    if unsafe:  # as the generated Makefiles refuse it: the runtime's logits would move (0.96 on the bundled model)
        raise CrystalError(f"CC={os.environ['CC']!r} has {unsafe[0]}, which changes the arithmetic the runtime is "
                           "checked with; remove it")
    return cc


def _compiler_identity(cc: list[str]) -> str:
    """What `cc` is now: its resolved path and its --version, so that an upgraded or switched compiler
    (cc from gcc to clang) builds afresh instead of reusing a binary another compiler made."""
    path = os.path.realpath(shutil.which(cc[0]) or cc[0])
    try:
        # LC_ALL=C: gcc translates its --version, which would give each locale a build of its own
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, errors="replace",
                                 timeout=60, env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.TimeoutExpired):  # the build itself will say what is wrong with it
        version = ""
    return f"{path}\0{shlex.join(cc[1:])}\0{version}"


def build_runtime(sanitize: bool = False, loader_only: bool = False, cflags: tuple[str, ...] | None = None) -> Path:
    """Path of the runtime binary, compiling it only when no cached build matches.

    `sanitize` builds with AddressSanitizer and UBSan (the tests); `loader_only`
    builds the program that loads a file, prints one summary line and exits.
    """
    cc = compiler()
    flags = list(cflags or (SANITIZE_CFLAGS if sanitize else CFLAGS))
    if loader_only:
        flags.append("-DCRYSTAL_LOADER_CHECK")
    srcs = runtime_sources(loader_only)
    include = templates_dir() / "c"
    h = hashlib.sha256(f"{__version__}\0{_compiler_identity(cc)}\0{' '.join(flags)}\0".encode())
    for p in srcs + sorted(include.glob("*.h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    name = "crystal_check" if loader_only else "crystal_runtime"
    out = cache_dir() / f"{name}-{__version__}-{h.hexdigest()[:16]}" / name
    # an entry is put in place whole (renamed), but a crash before the data reached the disk can leave it
    # empty: only a non-empty executable is trusted, anything else rebuilt
    try:
        if out.is_file() and out.stat().st_size > 0 and os.access(out, os.X_OK):
            return out
        return _compile(cc, flags, srcs, include, out)
    except OSError as e:
        raise CrystalError(f"cannot build the runtime in {out.parent} ({e.strerror or e}); "
                           "set CRYSTALC_CACHE to a writable folder") from None


def _compile(cc: list[str], flags: list[str], srcs: list[Path], include: Path, out: Path) -> Path:
    name = out.name
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        exe = Path(tmp) / name
        cmd = [*cc, *flags, f"-I{include}", *map(str, srcs), "-o", str(exe), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CrystalError(f"building the runtime failed ({shlex.join(cmd)}): "
                               + " ".join(proc.stderr.split())[:2000])
        if not exe.is_file():
            raise CrystalError(f"building the runtime made no program ({shlex.join(cmd)} succeeded but wrote no "
                               f"{exe.name}): is CC a C compiler?")
        exe.chmod(0o755)
        with open(exe, "rb") as f:
            os.fsync(f.fileno())
        os.replace(exe, out)  # same folder: atomic, and a concurrent build of the same key replaces it whole
    _evict(out)
    return out


RUN_NAME = "crystalc run"  # the runtime's argv[0] under `crystalc run`: the name its messages give
KEEP_BUILDS = 8  # of each program (runtime, loader check), the most recently built


def _evict(out: Path) -> None:
    """Remove the builds of the same program beyond the KEEP_BUILDS newest: a new compiler, flags or crystalc
    each add one, and nothing else would ever remove them."""
    prefix = out.name + "-"
    entries = []
    for d in out.parent.parent.iterdir():
        exe = d / out.name
        if d.name.startswith(prefix) and d.is_dir() and d != out.parent:
            try:
                entries.append((exe.stat().st_mtime if exe.exists() else d.stat().st_mtime, d))
            except OSError:  # another process removed it meanwhile
                pass
    for _, d in sorted(entries, reverse=True)[KEEP_BUILDS - 1:]:
        shutil.rmtree(d, ignore_errors=True)


def run_model(model_path: str | os.PathLike[str], args: list[str], prompt: str | None = None,
              n_heads: int | None = None) -> int:
    """Run the portable runtime on a model with the spec's command line; returns its exit status.

    A .crystal file runs as it is; any other model (.pt, .safetensors) is written
    to a temporary .crystal first. A text `prompt` goes to the runtime as it is
    when the model's tokenizer is characters, which the C runtime speaks; any other
    tokenizer (BPE) is run here: the prompt is encoded, the runtime takes its ids,
    and the ids it generates are decoded back into text. `n_heads` is for a
    checkpoint whose config does not say (a .crystal file's must agree).
    """
    from crystalc.frontend import CRYSTAL_MAGIC, load_model
    from crystalc.fsutil import model_file

    path = model_file(model_path)
    with open(path, "rb") as f:
        is_crystal = f.read(4) == CRYSTAL_MAGIC
    graph = load_model(path, n_heads) if not is_crystal or prompt is not None or n_heads is not None else None
    tokenizer = None
    if prompt is not None:
        assert graph is not None
        tok = graph.tokenizer or {}
        if tok.get("kind") == "char" or not tok:  # no tokenizer: the runtime says what to use instead
            args = ["--prompt", prompt, *args]
        else:
            from crystalc.tokenizer import Tokenizer

            tokenizer = Tokenizer(tok, graph.original_vocab_size)
            prompt_ids = tokenizer.encode(prompt)
            if not prompt_ids:
                raise CrystalError("the prompt encodes to no tokens")
            kept = set(int(i) for i in graph.original_ids())
            lost = [i for i in prompt_ids if i not in kept]
            if lost:  # said here, of the text: the runtime would speak of ids it was never given by the user
                raise CrystalError(f"--prompt: token {tokenizer.decode([lost[0]])!r} (id {lost[0]}) was pruned from "
                                   "this model's vocabulary")
            # the runtime keeps a prompt's last n_ctx tokens (the spec): only those go, which keeps a long
            # prompt's ids under the kernel's limit on one argument (128 KiB)
            window = prompt_ids[-graph.config.n_ctx:]
            args = ["--prompt-ids", ",".join(map(str, window)), *args]
    exe = build_runtime()
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="crystalc-run-") as tmp:
        model = path
        if not is_crystal:
            from crystalc.format.crystal import encode_crystal

            model = Path(tmp) / "model.crystal"
            assert graph is not None
            try:  # a private scratch file, deleted with its folder: not an output to write atomically or report
                model.write_bytes(encode_crystal(graph))
            except OSError as e:
                raise CrystalError(f"cannot write the model for the runtime in {tmp} ({e.strerror or e})") from None
        # its messages under the command's name ("crystalc run: error: ..."), not the cached binary's
        argv = [RUN_NAME, str(model), *args]
        try:
            if tokenizer is None or "--logits" in args:
                return _status(subprocess.run(argv, executable=exe).returncode)
            res = subprocess.run(argv, executable=exe, stdout=subprocess.PIPE, text=True)
        except OSError as e:  # e.g. a cache on a file system mounted noexec
            if e.errno == errno.E2BIG:  # ids of a window longer than 128 KiB as text (n_ctx in the tens of thousands)
                raise CrystalError("the prompt's last n_ctx token ids are more than one command-line argument may "
                                   "hold (128 KiB): give a shorter prompt") from None
            raise CrystalError(f"cannot run the runtime {exe} ({e.strerror or e}): set CRYSTALC_CACHE to a folder "
                               "whose file system lets programs run") from None
        if res.returncode == 0:
            generated = [int(x) for x in res.stdout.strip().split(",") if x]
            print(tokenizer.decode(prompt_ids + generated))
        return _status(res.returncode)


def _status(returncode: int) -> int:
    """The runtime's exit status as a shell reports it: killed by a signal (a closed pipe's SIGPIPE) is
    128 + the signal, not subprocess's -signal, which sys.exit made 256 - signal (243)."""
    return 128 - returncode if returncode < 0 else returncode
