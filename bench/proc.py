"""Run a program as a black box and measure it: wall time, peak RSS, exit status, output.

posix_spawn + wait4 gives each child's own rusage (so each run's peak RSS, not the
largest of all children so far, which is what getrusage(RUSAGE_CHILDREN) reports).
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass

# Single thread everywhere: BLAS, OpenMP and PyTorch in every child read these.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Run:
    wall_s: float
    maxrss_kb: int
    rc: int
    stdout: str
    stderr: str

    def ints(self) -> list[int]:
        return [int(x) for x in re.findall(r"-?\d+", self.stdout)]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SINGLE_THREAD_ENV)
    env.update(extra or {})
    return env


def run(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Spawn argv[0] (a path) with stdout/stderr to temporary files; time launch to exit."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        actions = [(os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
                   (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env or child_env(), file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Run(wall, int(usage.ru_maxrss), os.waitstatus_to_exitcode(status),
                   out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))


def check(r: Run, what: str) -> Run:
    if r.rc != 0:
        raise RuntimeError(f"{what}: exit status {r.rc}: {r.stderr.strip()[-400:]}")
    return r


def median(xs: list[float]) -> float:
    return statistics.median(xs)
