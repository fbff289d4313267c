"""The generated C program, driven as a black box through crystalc's CLI and its own command line.

Tokens/s of a program that must be launched for every measurement: time a run that
generates the stretch of interest and a run that stops just before it (same prompt,
same flags), take the median of several launches of each (interleaved, so drift in the
machine's load hits both alike), and divide the difference by the tokens in between.
Process start, loading the model and the prompt's own forward cancel out.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import proc

CRYSTALC = Path(sys.executable).with_name("crystalc")
SOURCE_SUFFIXES = (".c", ".h")


@dataclass(frozen=True)
class Build:
    binary: Path
    compile_s: float      # crystalc compile without --build (reading the .pt imports torch)
    build_s: float        # extra wall time of --build: the C compiler
    source_bytes: int     # generated .c and .h files
    binary_bytes: int
    files: dict[str, int]  # every file of the output folder -> size


def crystalc_compile(ckpt: Path, out: Path, quantize: str | None, build: bool) -> float:
    argv = [str(CRYSTALC), "compile", str(ckpt), "--target", "c", "-o", str(out)]
    if quantize:
        argv += ["--quantize", quantize]
    if build:
        argv.append("--build")
    r = proc.check(proc.run(argv), "crystalc " + " ".join(argv[1:]))
    return r.wall_s


def compile_and_build(ckpt: Path, work: Path, quantize: str | None, reps: int = 1) -> Build:
    """Emit the C once without building (its time), then emit and build (the difference is
    the C compiler's time). Medians of `reps` of each."""
    tag = quantize or "f32"
    src_dir, bin_dir = work / f"c-{tag}-src", work / f"c-{tag}"
    emit, full = [], []
    for _ in range(reps):
        emit.append(crystalc_compile(ckpt, src_dir, quantize, build=False))
        full.append(crystalc_compile(ckpt, bin_dir, quantize, build=True))
    shutil.rmtree(src_dir, ignore_errors=True)
    binary = bin_dir / "model"
    if not binary.is_file():
        raise RuntimeError(f"crystalc compile --build left no {binary}")
    files = {p.name: p.stat().st_size for p in sorted(bin_dir.iterdir()) if p.is_file()}
    src = sum(size for name, size in files.items() if name.endswith(SOURCE_SUFFIXES))
    e, f = proc.median(emit), proc.median(full)
    return Build(binary, e, max(f - e, 0.0), src, binary.stat().st_size, files)


def argv(binary: Path, prompt: list[int], n: int, shift: int) -> list[str]:
    return [str(binary), "--prompt-ids", ",".join(map(str, prompt)), "-n", str(n), "-t", "0",
            "--shift", str(shift)]


def generate(binary: Path, prompt: list[int], n: int, shift: int) -> tuple[list[int], proc.Run]:
    """The generated ids (the program prints them; the prompt's ids are not echoed back)."""
    r = proc.check(proc.run(argv(binary, prompt, n, shift)), f"{binary.name} -n {n}")
    ids = r.ints()
    return ids[-n:] if n else [], r


@dataclass(frozen=True)
class Rate:
    tokens_per_s: float
    long_s: float      # median wall time of the longer run
    short_s: float     # median wall time of the shorter run
    tokens: int        # tokens between them
    maxrss_kb: int


def rate(binary: Path, prompt: list[int], n_short: int, n_long: int, shift: int, reps: int) -> Rate:
    longs, shorts, rss = [], [], 0
    for _ in range(reps):
        for n, sink in ((n_long, longs), (n_short, shorts)):
            r = proc.check(proc.run(argv(binary, prompt, n, shift)), f"{binary.name} -n {n}")
            sink.append(r.wall_s)
            rss = max(rss, r.maxrss_kb)
    lo, sh = proc.median(longs), proc.median(shorts)
    tokens = n_long - n_short
    dt = lo - sh
    return Rate(tokens / dt if dt > 0 else float("nan"), lo, sh, tokens, rss)


def cold(argv_: list[str], reps: int, env: dict[str, str] | None = None) -> tuple[float, int, list[int]]:
    """(median wall time launch -> exit, peak RSS in KiB, ids printed by the last run)."""
    walls, rss, out = [], 0, []
    for _ in range(reps):
        r = proc.check(proc.run(argv_, env), Path(argv_[0]).name)
        walls.append(r.wall_s)
        rss = max(rss, r.maxrss_kb)
        out = r.ints()
    return proc.median(walls), rss, out
