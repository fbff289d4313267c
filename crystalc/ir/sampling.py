"""Choosing the next token: the generated programs' sampler, as the reference they are tested against.

`-t 0` is greedy (the first maximum). Otherwise the probabilities are
softmax(logits / t), restricted with `--top-p` to the smallest set of most likely
tokens holding that share of the mass, and one is drawn with splitmix64 seeded
by `--seed`. Drawing is a threshold test on running sums, so the arithmetic is
the C's to the bit (float32 probabilities, double sums in the same order, ties
in id order, libm's exp): the same seed then draws the same token from the same
logits. `interpret.generate(graph, prompt, n, pick=Sampler(t, top_p, seed))`
continues a prompt as the generated program does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MASK64 = (1 << 64) - 1


class SplitMix64:
    """The programs' random numbers: splitmix64, and uniform doubles from its top 53 bits."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64  # a negative --seed wraps as the C's conversion to unsigned does

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next() >> 11) * 2.0 ** -53


def first_argmax(logits: np.ndarray) -> int:
    """The first index of the largest logit, ignoring NaNs (0 when all are NaN)."""
    if np.isnan(logits).all():
        return 0
    return int(np.nanargmax(logits))


def probabilities(logits: np.ndarray, temperature: float) -> list[float]:
    """Unnormalised softmax(logits / t) as float32 values (held as floats); the largest is 1."""
    x = np.asarray(logits, dtype=np.float32)
    diff = (x - x[first_argmax(x)]).astype(np.float32)  # a float32 subtraction, as in the C
    return [float(np.float32(math.exp(float(d) / temperature))) for d in diff]


def nucleus(p: Sequence[float], top_p: float, best: int) -> tuple[list[int], float]:
    """The ids to draw from, in draw order, and their total mass.

    At top_p 1 every id in id order; otherwise the most likely first (ties in id
    order), as few as hold top_p of the mass. Ids below (1 - top_p) / (V - 1) of
    the mass are dropped before sorting, as the C does: together they hold less
    than 1 - top_p, so the set reaching top_p never needs them.
    """
    total = 0.0
    for q in p:
        total += q
    if top_p >= 1.0:
        return list(range(len(p))), total
    cutoff = (1.0 - top_p) / (len(p) - 1) * total if len(p) > 1 else 0.0
    cand = sorted((i for i, q in enumerate(p) if q >= cutoff or i == best), key=lambda i: -p[i])
    mass = 0.0
    for k, i in enumerate(cand):
        mass += p[i]
        if mass >= top_p * total:
            return cand[:k + 1], mass
    return cand, mass


def draw(p: Sequence[float], ids: Sequence[int], total: float, u: float) -> int:
    """The first id whose running sum passes u * total."""
    r = u * total
    acc = 0.0
    for i in ids:
        acc += p[i]
        if r < acc:
            return i
    return ids[-1]


class Sampler:
    """A `pick` for interpret.generate: the next current-vocabulary row, as the programs choose it."""

    def __init__(self, temperature: float, top_p: float = 1.0, seed: int = 42) -> None:
        if not temperature >= 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")
        self.temperature = temperature
        self.top_p = top_p
        self.rng = SplitMix64(seed)

    def __call__(self, logits: np.ndarray) -> int:
        best = first_argmax(np.asarray(logits, dtype=np.float32))
        if self.temperature == 0:
            return best  # greedy draws no random number
        p = probabilities(logits, self.temperature)
        ids, total = nucleus(p, self.top_p, best)
        return draw(p, ids, total, self.rng.uniform())
