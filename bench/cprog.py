"""The generated C program, driven as a black box through crystalc's CLI and its own command line.

Building it, timing the build, and its command line; bench/sampling.py times its
generation (the difference method) and `cold` its start.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    shutil.rmtree(src_dir, ignore_errors=True)
    emit = [crystalc_compile(ckpt, src_dir, quantize, build=False) for _ in range(reps)]
    shutil.rmtree(src_dir, ignore_errors=True)
    shutil.rmtree(bin_dir, ignore_errors=True)  # ours: a fresh folder, however an older crystalc left it
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
    files = {p.name: p.stat().st_size for p in sorted(bin_dir.iterdir())
             if p.is_file() and p.suffix != ".o" and not p.name.startswith(".")}  # not crystalc's output mark
    src = sum(size for name, size in files.items() if name.endswith(SOURCE_SUFFIXES))
    data = sum(size for name, size in files.items() if name.endswith(DATA_SUFFIXES))
    return Build(binary, proc.median(emit), build_s, src, data, binary.stat().st_size, files)


def logit_error(binary: Path, model: Any, prompt: list[int]) -> float:
    """max |C logit - PyTorch logit| / max(1, max |PyTorch logit|) at the prompt's last position (model: a
    CrystalLM; report.LOGIT_TOL gates on it)."""
    import numpy as np
    import torch
    import torch_gen

    out = subprocess.run([str(binary), "--prompt-ids", ",".join(map(str, prompt)), "--logits"],
                         capture_output=True, text=True, check=True).stdout
    got = np.array([float(line.split()[1]) for line in out.splitlines()], dtype=np.float64)
    with torch.inference_mode():
        want = torch_gen.forward_last(model, torch.tensor([prompt])).double().numpy()
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def argv(binary: Path, prompt: list[int], n: int, shift: int) -> list[str]:
    return [str(binary), "--prompt-ids", ",".join(map(str, prompt)), "-n", str(n), "-t", "0",
            "--shift", str(shift)]


def cold(argv_: list[str], reps: int, env: dict[str, str] | None = None) -> dict:
    """Median wall and CPU time launch -> exit, peak RSS in KiB of one more run, ids printed by the last run."""
    runs = [proc.check(proc.run(argv_, env), Path(argv_[0]).name) for _ in range(reps)]
    return {"wall_s": proc.median([r.wall_s for r in runs]), "cpu_s": proc.median([r.cpu_s for r in runs]),
            "maxrss_kb": proc.peak_rss_kb(argv_, env), "tokens": runs[-1].ints()}
