"""Freezing (crystallisation): the seeds' "graceful" schedule, and soft freezing.

Hard freezing marks a neuron's `frozen` bit: from then on its parameters get no
gradient and never change. The graceful schedule freezes nothing in the first 20%
of training; after that, each freezing round has an aggression of 0.3 (20-50%),
0.6 (50-80%) and 1.0 (80-100%). Candidates are non-frozen neurons at least
`min_age` rounds old with a full history, ranked coldest first by
coldness = -mean - 10 x variance of their last 10 gradient-norm readings (small,
steady gradients: the neuron has settled). A round freezes up to
10% x aggression of the candidates (at least 1, at most 15), taking only
candidates whose activity is below the block's median (busy neurons stay plastic).

Soft freezing (the later journal) never zeroes learning: a neuron's learning rate
is multiplied by max(0.01, 0.5 ** (age / halflife)).
"""

from __future__ import annotations

import torch

from crystalc.train.stats import HISTORY, FieldStats

PHASES = ((0.2, 0.0), (0.5, 0.3), (0.8, 0.6), (1.0, 1.0))  # (phase ends at progress, aggression)


def aggression(progress: float) -> float:
    for end, a in PHASES:
        if progress < end:
            return a
    return PHASES[-1][1]


def coldness(stats: FieldStats) -> torch.Tensor:
    h = stats.history
    return -h.mean(1) - 10.0 * h.var(1, unbiased=False)


def choose_frozen(stats: FieldStats, frozen: torch.Tensor, activity: torch.Tensor, progress: float,
                  round_: int, min_age: int, fraction: float = 0.1, lo: int = 1, hi: int = 15) -> torch.Tensor:
    """Indices of the neurons to freeze this round (possibly none)."""
    a = aggression(progress)
    frozen = frozen.cpu()
    age = round_ - stats.birth
    cand = (~frozen) & (age >= min_age) & (stats.n_readings >= HISTORY)
    n_cand = int(cand.sum())
    if a <= 0 or n_cand == 0:
        return torch.zeros(0, dtype=torch.long)
    k = max(lo, min(hi, int(fraction * a * n_cand)))
    quiet = activity.cpu() < activity.median()
    ok = (cand & quiet).nonzero().squeeze(1)
    if len(ok) == 0:
        return ok
    order = torch.sort(coldness(stats)[ok], descending=True, stable=True).indices
    return ok[order[:k]]


def soft_multiplier(stats: FieldStats, round_: int, halflife: float) -> torch.Tensor:
    """Per-neuron learning-rate multiplier of soft freezing."""
    age = (round_ - stats.birth).double()  # float32 would round a tiny halflife to 0, and age 0 / 0 to NaN
    return torch.clamp(0.5 ** (age / halflife), min=0.01).float()
