"""The reference sampler on hand-made logits (tests/backends and tests/runtime hold it against the C)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crystalc.ir.sampling import Sampler, SplitMix64, draw, first_argmax, nucleus, probabilities


def test_splitmix64_known_values() -> None:
    # splitmix64 seeded with 0 (Steele, Lea and Flood 2014; the generator Java's SplittableRandom uses)
    rng = SplitMix64(0)
    assert [rng.next() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert SplitMix64(-1).state == 2 ** 64 - 1
    u = [SplitMix64(s).uniform() for s in range(100)]
    assert all(0 <= x < 1 for x in u)


def test_first_argmax_ignores_nans() -> None:
    assert first_argmax(np.array([1, 3, 3, 2], np.float32)) == 1
    assert first_argmax(np.array([np.nan, 1, 5, np.nan], np.float32)) == 2
    assert first_argmax(np.array([np.nan, np.nan], np.float32)) == 0


def test_probabilities_are_float32_softmax_numerators() -> None:
    p = probabilities(np.array([0.0, 2.0, 1.0], np.float32), 0.5)
    assert p[1] == 1.0
    assert p == [float(np.float32(math.exp(-4.0))), 1.0, float(np.float32(math.exp(-2.0)))]


def test_nucleus_is_the_smallest_most_likely_set() -> None:
    p = [0.1, 0.4, 0.2, 0.2, 0.1]  # total 1.0
    assert nucleus(p, 1.0, 1) == ([0, 1, 2, 3, 4], pytest.approx(1.0))
    ids, mass = nucleus(p, 0.5, 1)
    assert ids == [1, 2] and mass == pytest.approx(0.6)  # ties (0.2, 0.2) in id order
    ids, _ = nucleus(p, 0.8, 1)
    assert ids == [1, 2, 3]
    assert nucleus(p, 1e-9, 1)[0] == [1]


def test_draw_walks_the_running_sums() -> None:
    p = [0.25, 0.5, 0.25]
    assert [draw(p, [0, 1, 2], 1.0, u) for u in (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999)] == [0, 0, 1, 1, 2, 2]
    assert [draw(p, [1, 0], 0.75, u) for u in (0.6, 0.7)] == [1, 0]  # the order given, not id order


def test_greedy_draws_no_random_number() -> None:
    s = Sampler(0.0, 0.9, 42)
    state = s.rng.state
    assert s(np.array([0.5, 2.0, 1.0], np.float32)) == 1
    assert s.rng.state == state


def test_sampling_follows_the_probabilities() -> None:
    logits = np.log(np.array([0.1, 0.6, 0.3], np.float32))
    s = Sampler(1.0, 1.0, 3)
    counts = np.bincount([s(logits) for _ in range(20000)], minlength=3) / 20000
    np.testing.assert_allclose(counts, [0.1, 0.6, 0.3], atol=0.015)
    narrow = Sampler(1.0, 0.65, 3)
    assert set(narrow(logits) for _ in range(2000)) == {1, 2}  # 0.6 + 0.3 reach 0.65; 0.1 never drawn


@pytest.mark.parametrize(("t", "top_p"), [(-0.1, 0.9), (1.0, 0.0), (1.0, 1.5), (float("nan"), 0.9)])
def test_bad_settings(t: float, top_p: float) -> None:
    with pytest.raises(ValueError):
        Sampler(t, top_p)
