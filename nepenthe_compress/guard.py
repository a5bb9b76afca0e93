"""The whole-model speed guard: which folded variant may be written, judged on measured latency.

Every variant (the planned fold, simpler exact ones such as ``merge none`` or keep-channels) is timed
side by side with the original (``bench.compare_latency``: interleaved repeats, medians and IQRs). A
variant is *slower beyond noise* at a batch size when its median exceeds the original's by more than
the noise: half the larger interquartile range of the two, and at least ``MIN_NOISE`` of the original's
median. The planned variant is kept when it is not slower at any batch size; otherwise the fastest
variant that is not slower anywhere is chosen (and the report says why); when every variant is slower,
nothing is chosen: a slower fold is a failed fold.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_NOISE = 0.02   # a difference under 2 % of the original's median is never called slower


@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float


@dataclass(frozen=True)
class GuardDecision:
    chosen: str | None                      # the variant to write; None: every variant is slower
    reason: str
    speedups: dict[str, dict[int, float]]   # variant -> batch -> original median / variant median
    slower: dict[str, list[int]]            # variant -> batch sizes where it is slower beyond noise


def slower_beyond_noise(candidate: Timing, original: Timing) -> bool:
    noise = max(max(candidate.iqr_s, original.iqr_s) / 2, MIN_NOISE * original.median_s)
    return candidate.median_s > original.median_s + noise


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def choose_variant(original: dict[int, Timing], variants: dict[str, dict[int, Timing]], planned: str,
                   require_speedup: float | None = None) -> GuardDecision:
    """Pick the variant to write from per-batch timings (``variants`` in order of preference after
    ``planned``). ``require_speedup``: the chosen variant must be at least that many times faster
    than the original at every batch size, else nothing is chosen."""
    if planned not in variants:
        raise ValueError(f"planned variant {planned!r} was not timed")
    speedups = {name: {b: original[b].median_s / t.median_s for b, t in times.items()}
                for name, times in variants.items()}
    slower = {name: [b for b, t in times.items() if slower_beyond_noise(t, original[b])]
              for name, times in variants.items()}
    ok = [name for name in variants if not slower[name]]
    if planned in ok:
        chosen, reason = planned, "the plan is not slower than the original at any batch size"
    elif ok:
        chosen = max(ok, key=lambda n: _geomean(list(speedups[n].values())))
        batches = ", ".join(map(str, slower[planned]))
        reason = f"{planned} was slower than the original at batch {batches}: fell back to {chosen}"
    else:
        return GuardDecision(None, "every folded variant is slower than the original beyond noise", speedups, slower)
    if require_speedup is not None and min(speedups[chosen].values()) < require_speedup:
        worst = min(speedups[chosen].items(), key=lambda kv: kv[1])
        return GuardDecision(None, f"{chosen} is {worst[1]:.2f}x the original at batch {worst[0]}, "
                             f"short of --require-speedup {require_speedup:g}", speedups, slower)
    return GuardDecision(chosen, reason, speedups, slower)
