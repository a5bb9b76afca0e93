"""The speed guard's decision on injected timings: keep the plan when it is not slower, fall back to
the fastest variant that is not slower, refuse when all are slower or short of --require-speedup."""
from __future__ import annotations

import pytest

from nepenthe_compress.guard import MIN_NOISE, Timing, choose_variant, slower_beyond_noise

ORIGINAL = {1: Timing(10.0, 0.4), 32: Timing(300.0, 10.0)}


def t(b1: float, b32: float, iqr: float = 0.0) -> dict[int, Timing]:
    return {1: Timing(b1, iqr), 32: Timing(b32, iqr)}


def test_noise_is_half_the_larger_iqr_with_a_floor() -> None:
    base = Timing(10.0, 1.0)
    assert not slower_beyond_noise(Timing(10.5, 0.2), base)      # within iqr / 2 = 0.5
    assert slower_beyond_noise(Timing(10.51, 0.2), base)
    quiet = Timing(10.0, 0.0)
    assert not slower_beyond_noise(Timing(10.0 * (1 + MIN_NOISE), 0.0), quiet)
    assert slower_beyond_noise(Timing(10.0 * (1 + MIN_NOISE) + 1e-9, 0.0), quiet)


def test_the_plan_is_kept_when_not_slower() -> None:
    d = choose_variant(ORIGINAL, {"auto": t(8.0, 250.0), "none": t(6.0, 200.0)}, "auto")
    assert d.chosen == "auto" and d.slower == {"auto": [], "none": []}
    assert d.speedups["auto"] == {1: 10.0 / 8.0, 32: 300.0 / 250.0}


def test_a_slow_plan_falls_back_to_the_fastest_variant_that_is_not_slower() -> None:
    # the plan is slower at batch 32 (the injected slow variant); of the others, "none" is faster overall
    variants = {"auto": t(8.0, 340.0), "keep-channels": t(9.5, 290.0), "none": t(7.0, 260.0)}
    d = choose_variant(ORIGINAL, variants, "auto")
    assert d.chosen == "none"
    assert d.reason == "auto was slower than the original at batch 32: fell back to none"
    assert d.slower["auto"] == [32]


def test_nothing_is_chosen_when_every_variant_is_slower() -> None:
    d = choose_variant(ORIGINAL, {"auto": t(12.0, 320.0), "none": t(11.0, 330.0)}, "auto")
    assert d.chosen is None and "every folded variant is slower" in d.reason


@pytest.mark.parametrize("required, chosen", [(1.1, "auto"), (1.3, None)])
def test_require_speedup(required: float, chosen: str | None) -> None:
    d = choose_variant(ORIGINAL, {"auto": t(8.0, 250.0)}, "auto", require_speedup=required)
    assert d.chosen == chosen
    if chosen is None:
        assert d.reason == "auto is 1.20x the original at batch 32, short of --require-speedup 1.3"
