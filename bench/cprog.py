"""The generated C program, driven as a black box through crystalc's CLI and its own command line.

Tokens/s of a program that must be launched for every measurement: time a run that
generates the stretch of interest and a run that stops just before it (same prompt,
same flags), take the median of several launches of each (interleaved, so drift in the
machine's load hits both alike), and divide the tokens in between by the difference.
Process start, loading the model and the prompt's own forward cancel out. Done twice:
with CPU time (the headline figure) and with wall time.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import proc

CRYSTALC = Path(sys.executable).with_name("crystalc")
SOURCE_SUFFIXES = (".c", ".h", ".S")   # what crystalc writes as text; weights.bin is data
DATA_SUFFIXES = (".bin",)


@dataclass(frozen=True)
class Build:
    binary: Path
    compile_s: float      # crystalc compile without --build (reading the .pt imports torch)
    build_s: float        # the C compiler: `make -B` in the output folder
    source_bytes: int     # generated .c, .h and .S files
    data_bytes: int       # weight files beside them (.bin), embedded into the binary by the build
    binary_bytes: int
    files: dict[str, int]  # every file of the output folder but object files -> size


def crystalc_compile(ckpt: Path, out: Path, quantize: str | None, build: bool) -> float:
    argv = [str(CRYSTALC), "compile", str(ckpt), "--target", "c", "-o", str(out)]
    if quantize:
        argv += ["--quantize", quantize]
    if build:
        argv.append("--build")
    r = proc.check(proc.run(argv), "crystalc " + " ".join(argv[1:]))
    return r.wall_s


def compile_and_build(ckpt: Path, work: Path, quantize: str | None, reps: int = 1) -> Build:
    """Time `crystalc compile` emitting the C (median of reps), build it with `--build`, and
    time the C compiler alone: `make -B` in the output folder, the very command `--build`
    runs (median of reps). Without a Makefile the build time is the wall-time difference
    between `--build` and the plain command."""
    tag = quantize or "f32"
    src_dir, bin_dir = work / f"c-{tag}-src", work / f"c-{tag}"
    emit = [crystalc_compile(ckpt, src_dir, quantize, build=False) for _ in range(reps)]
    shutil.rmtree(src_dir, ignore_errors=True)
    full = crystalc_compile(ckpt, bin_dir, quantize, build=True)
    binary = bin_dir / "model"
    if not binary.is_file():
        raise RuntimeError(f"crystalc compile --build left no {binary}")
    make = shutil.which("make")
    if (bin_dir / "Makefile").is_file() and make:
        cmd = [make, "-B", "-s", "-C", str(bin_dir), "model"]
        build_s = proc.median([proc.check(proc.run(cmd), "make").wall_s for _ in range(reps)])
    else:
        build_s = max(full - proc.median(emit), 0.0)
    files = {p.name: p.stat().st_size for p in sorted(bin_dir.iterdir()) if p.is_file() and p.suffix != ".o"}
    src = sum(size for name, size in files.items() if name.endswith(SOURCE_SUFFIXES))
    data = sum(size for name, size in files.items() if name.endswith(DATA_SUFFIXES))
    return Build(binary, proc.median(emit), build_s, src, data, binary.stat().st_size, files)


def argv(binary: Path, prompt: list[int], n: int, shift: int) -> list[str]:
    return [str(binary), "--prompt-ids", ",".join(map(str, prompt)), "-n", str(n), "-t", "0",
            "--shift", str(shift)]


@dataclass(frozen=True)
class Rate:
    tokens_per_s: float       # from CPU time
    tokens_per_s_wall: float  # from wall time
    long_s: float      # median CPU time of the longer run
    short_s: float     # median CPU time of the shorter run
    long_wall_s: float
    short_wall_s: float
    tokens: int        # tokens between them
    range: tuple[float, float]  # min and max by CPU time over the interleaved (long, short) pairs
    reps: int
    generated: list[int]  # the ids the longer run printed


def rate(binary: Path, prompt: list[int], n_short: int, n_long: int, shift: int, min_reps: int, max_reps: int,
         budget_s: float) -> Rate:
    """The difference method. One untimed launch of the long run (warms the page cache and
    gives the tokens), then as many interleaved pairs as fit in budget_s, within the bounds."""
    first = proc.check(proc.run(argv(binary, prompt, n_long, shift)), f"{binary.name} -n {n_long}")
    reps = max(min_reps, min(max_reps, int(budget_s / max(first.wall_s, 1e-3))))
    runs: dict[int, list[proc.Run]] = {n_long: [], n_short: []}
    for _ in range(reps):
        for n in (n_long, n_short):
            runs[n].append(proc.check(proc.run(argv(binary, prompt, n, shift)), f"{binary.name} -n {n}"))
    tokens = n_long - n_short

    def per_s(key: str) -> tuple[float, float, float]:
        lo = proc.median([getattr(r, key) for r in runs[n_long]])
        sh = proc.median([getattr(r, key) for r in runs[n_short]])
        return (tokens / (lo - sh) if lo > sh else float("nan")), lo, sh

    cpu, lo, sh = per_s("cpu_s")
    wall, lo_w, sh_w = per_s("wall_s")
    pairs = [tokens / (a.cpu_s - b.cpu_s)
             for a, b in zip(runs[n_long], runs[n_short], strict=True) if a.cpu_s > b.cpu_s]
    spread = (min(pairs), max(pairs)) if pairs else (float("nan"), float("nan"))
    return Rate(cpu, wall, lo, sh, lo_w, sh_w, tokens, spread, reps, first.ints()[-n_long:])


def cold(argv_: list[str], reps: int, env: dict[str, str] | None = None) -> dict:
    """Median wall and CPU time launch -> exit, peak RSS in KiB of one more run, ids printed by the last run."""
    runs = [proc.check(proc.run(argv_, env), Path(argv_[0]).name) for _ in range(reps)]
    return {"wall_s": proc.median([r.wall_s for r in runs]), "cpu_s": proc.median([r.cpu_s for r in runs]),
            "maxrss_kb": proc.peak_rss_kb(argv_, env), "tokens": runs[-1].ints()}
