"""Repeated measurements taken in rounds, so that every implementation of a regime sees the same machine.

The cores are shared and the load of other jobs drifts from minute to minute. Measuring
one implementation's repetitions in a block and then the next one's would put that
drift into the ratio; here every round takes one sample of each implementation in turn,
and each implementation's figure is the median over the rounds.

C program (a new process per sample): the difference method. A sample is a launch of
the run that generates the stretch of interest and a launch of the run that stops just
before it (same prompt, same flags); tokens/s = tokens in between / (median long -
median short), over all rounds. Process start, loading the model and the prompt's own
forward cancel out. Done with CPU time (the headline) and with wall time.

In-process baselines: a generator yields each token; a sample is one generation, timed
from the token the C difference also removes to the last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cprog
import proc


def timed(gen: Iterator[int], skip: int) -> tuple[list[int], float, float]:
    """All tokens of `gen`, and the (CPU, wall) seconds spent producing those after the first `skip`.

    CPU time is this process's (every thread's); the baselines compute on one thread."""
    toks: list[int] = []
    c0, w0 = time.process_time(), time.perf_counter()
    for tok in gen:
        toks.append(tok)
        if len(toks) == skip:
            c0, w0 = time.process_time(), time.perf_counter()
    return toks, time.process_time() - c0, time.perf_counter() - w0


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


class CProgram:
    def __init__(self, binary: Path, prompt: list[int], n_short: int, n_long: int, shift: int) -> None:
        self.binary, self.prompt, self.shift = binary, prompt, shift
        self.n_short, self.n_long = n_short, n_long
        self.longs: list[proc.Run] = []
        self.shorts: list[proc.Run] = []
        self.tokens: list[int] = []

    def _launch(self, n: int) -> proc.Run:
        return proc.check(proc.run(cprog.argv(self.binary, self.prompt, n, self.shift)), f"{self.binary} -n {n}")

    def warm_up(self) -> None:
        """Untimed: pages the binary in and records the ids it generates."""
        self.tokens = self._launch(self.n_long).ints()[-self.n_long:]

    def sample(self) -> None:
        self.longs.append(self._launch(self.n_long))
        self.shorts.append(self._launch(self.n_short))

    def result(self) -> dict:
        tokens = self.n_long - self.n_short

        def med(runs: list[proc.Run], key: str) -> float:
            return proc.median([getattr(r, key) for r in runs])

        pairs = [_rate(tokens, a.cpu_s - b.cpu_s) for a, b in zip(self.longs, self.shorts, strict=True)]
        return {"tokens_per_s": _rate(tokens, med(self.longs, "cpu_s") - med(self.shorts, "cpu_s")),
                "tokens_per_s_wall": _rate(tokens, med(self.longs, "wall_s") - med(self.shorts, "wall_s")),
                "range": [min(pairs), max(pairs)], "timed_tokens": tokens, "reps": len(self.longs),
                "long_cpu_s": med(self.longs, "cpu_s"), "short_cpu_s": med(self.shorts, "cpu_s"),
                "tokens": self.tokens}


class InProcess:
    def __init__(self, make: Callable[[], Iterator[int]], skip: int) -> None:
        self.make, self.skip = make, skip
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self.tokens: list[int] = []

    def warm_up(self) -> None:
        self.tokens = timed(self.make(), self.skip)[0]

    def sample(self) -> None:
        toks, c, w = timed(self.make(), self.skip)
        self.cpu.append(_rate(len(toks) - self.skip, c))
        self.wall.append(_rate(len(toks) - self.skip, w))

    def result(self) -> dict:
        return {"tokens_per_s": proc.median(self.cpu), "tokens_per_s_wall": proc.median(self.wall),
                "range": [min(self.cpu), max(self.cpu)], "reps": len(self.cpu), "tokens": self.tokens}


def measure(samplers: dict[str, CProgram | InProcess], rounds: int) -> dict[str, dict]:
    """One warm-up each, then `rounds` rounds of one sample of each; every one's result."""
    for s in samplers.values():
        s.warm_up()
    for _ in range(rounds):
        for s in samplers.values():
            s.sample()
    return {name: s.result() for name, s in samplers.items()}
