"""Run a program as a black box and measure it: wall and CPU time, exit status, output; peak RSS apart.

CPU time (user + system, from wait4) is what the program itself spent on a core; on a
machine whose cores are shared, wall time also counts the moments other processes held
the core, so both are recorded (bench/README.md says which figure is used where).

Peak RSS is not read from this process's own children: a child spawned from a large
Python process inherits its memory's high-water mark across exec (Linux records the old
mm's peak into ru_maxrss), so every child would look as big as the benchmark. GNU time
starts the program from its own small process instead.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GNU_TIME = "/usr/bin/time"
# Single thread everywhere: BLAS, OpenMP and PyTorch in every child read these.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float      # user + system time of the child (and any children it waited for)
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
        return Run(wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status),
                   out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))


def peak_rss_kb(argv: list[str], env: dict[str, str] | None = None) -> int | None:
    """Peak resident set size of one run, in KiB (GNU time's %M); None without /usr/bin/time."""
    if not os.path.exists(GNU_TIME):
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
        check(run([GNU_TIME, "-f", "%M", "-o", f.name, *argv], env), Path(argv[0]).name)
        return int(f.read().split()[-1])


def check(r: Run, what: str) -> Run:
    if r.rc != 0:
        raise RuntimeError(f"{what}: exit status {r.rc}: {r.stderr.strip()[-400:]}")
    return r


def median(xs: list[float]) -> float:
    return statistics.median(xs)
