"""NEPENTHE/EGP budget (docs/DESIGN.md 3, eq. 4-8) and IMP counts against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nepenthe_compress.prune.budget import global_magnitude_counts, nepenthe_budget, prune_amount, softmax, target_cap


def _shares(r: list[float]) -> list[float]:
    """Reference softmax written out with math.exp (float64)."""
    top = max(r)
    e = [math.exp(v - top) for v in r]
    return [v / sum(e) for v in e]


def test_budget_hand_example():
    # H = [1, .5, .25], mean|w| = .1 -> I = [.1, .05, .025], sum 0.175 -> R = [1.75, 3.5, 7]
    expected = [1000 * s for s in _shares([1.75, 3.5, 7.0])]   # [5.07, 29.16, 965.77]
    got = nepenthe_budget(1000, [1.0, 0.5, 0.25], [0.1, 0.1, 0.1], [10**6] * 3)
    assert got.tolist() == [5, 29, 966]      # floors 5, 29, 965 (999); the unit left goes to .77
    assert all(abs(g - e) < 1 for g, e in zip(got, expected))


def test_budget_overflow_is_redistributed():
    # layer 2 asks 965.8 but has 500: pruned fully, the other 500 split by softmax([1.75, 3.5])
    share0 = math.exp(1.75) / (math.exp(1.75) + math.exp(3.5))          # 0.148
    got = nepenthe_budget(1000, [1.0, 0.5, 0.25], [0.1, 0.1, 0.1], [1000, 1000, 500])
    assert got.tolist() == [74, 426, 500]
    assert abs(got[0] - 500 * share0) < 1


def test_budget_overflow_cascades():
    # after layer 2 (500) saturates, layer 1 is asked 426 > 300; the last 200 go to layer 0
    got = nepenthe_budget(1000, [1.0, 0.5, 0.25], [0.1, 0.1, 0.1], [1000, 300, 500])
    assert got.tolist() == [200, 300, 500]


def test_budget_more_than_everything_prunes_everything():
    got = nepenthe_budget(10**6, [1.0, 0.5], [0.1, 0.2], [7, 9])
    assert got.tolist() == [7, 9]


def test_budget_zero_importance_gets_r_zero():
    # I = [0, .1, .3], sum .4 -> R = [0 (I=0), 4, 4/3]
    expected = [1000 * s for s in _shares([0.0, 4.0, 4.0 / 3.0])]     # [16.84, 919.29, 63.88]
    got = nepenthe_budget(1000, [0.0, 1.0, 1.0], [0.1, 0.1, 0.3], [10**6] * 3)
    assert got.tolist() == [17, 919, 64]
    assert all(abs(g - e) < 1 for g, e in zip(got, expected))


def test_budget_layers_with_nothing_left_get_nothing():
    got = nepenthe_budget(10, [1.0, 1.0], [0.0, 0.5], [0, 100])
    assert got.tolist() == [0, 10]


def test_softmax_stable_for_large_r():
    r = [1000.0, 999.0, -5.0]
    got = softmax(np.array(r))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _shares(r), rtol=1e-12)
    assert abs(got[0] - 1 / (1 + math.exp(-1))) < 1e-12


@pytest.mark.parametrize("tiny", [1e-6, 1e-300, 5e-324])
def test_budget_huge_r_sends_everything_to_the_least_important_layer(tiny):
    # I = [tiny, 1] -> R_0 = (1 + tiny) / tiny (up to inf), R_1 ~ 1: layer 0 takes all it has, the rest overflows
    got = nepenthe_budget(100, [1.0, 1.0], [tiny, 1.0], [30, 1000])
    assert got.tolist() == [30, 70]


def test_budget_totals_and_caps_random():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        remaining = rng.integers(0, 50, n)
        h = rng.uniform(0, 1, n) * (rng.uniform(size=n) > 0.2)
        m = rng.uniform(1e-3, 1, n)
        p = int(rng.integers(0, 200))
        got = nepenthe_budget(p, h, m, remaining)
        assert got.sum() == min(p, remaining.sum())
        assert (got >= 0).all() and (got <= remaining).all()


def test_global_magnitude_counts_with_ties():
    layers = [np.array([0.1, 0.5, 0.3]), np.array([0.2, 0.1])]
    # sorted: .1 (L0), .1 (L1), .2 (L1), .3 (L0), .5 (L0); equal values: earlier layer first
    assert global_magnitude_counts(layers, 1).tolist() == [1, 0]
    assert global_magnitude_counts(layers, 2).tolist() == [1, 1]
    assert global_magnitude_counts(layers, 3).tolist() == [1, 2]
    assert global_magnitude_counts(layers, 4).tolist() == [2, 2]
    assert global_magnitude_counts(layers, 99).tolist() == [3, 2]


def test_prune_amount_and_target_cap():
    assert prune_amount(0.5, 1001) == 501                 # half up
    assert prune_amount(0.5, 1000, cap=120) == 120
    # 93.75% of 1024 weights: keep 64; with 128 left, 64 more may go
    assert target_cap(128, 1024, 0.9375) == 64
    assert target_cap(64, 1024, 0.9375) == 0
    assert target_cap(100, 1024, None) is None
