"""The whole-model speed guard of ``fold``: the planned fold and simpler exact variants of it, timed
side by side with the original on the target runtime before anything is written (``guard`` decides).

Under the default ``--merge auto`` a planned fold slower than the original beyond noise falls back to
the fastest variant that is not (keep-channels, ``merge none``, both); when every variant is slower,
nothing is written. An explicit ``--merge all|none`` is the user's choice: it is timed and reported,
and written even when slower (with a warning). ``--require-speedup X`` applies to every mode.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from nepenthe_compress.bench import LatencyTable
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.guard import GuardDecision, Timing, choose_variant


def variant_name(options: FoldOptions) -> str:
    """'merge auto', 'merge none, keep channels', ..."""
    return f"merge {options.merge}" + ("" if options.drop_channels else ", keep channels")


def variants_to_time(planned: FoldOptions) -> dict[str, FoldOptions]:
    """The planned options first, then (under ``--merge auto`` only) the simpler exact fallbacks in
    order of preference, without repeats."""
    candidates = [planned]
    if planned.merge == "auto":
        candidates += [replace(planned, drop_channels=False), replace(planned, merge="none"),
                       replace(planned, merge="none", drop_channels=False)]
    return {variant_name(o): o for o in dict.fromkeys(candidates)}


def timings(table: LatencyTable, model: str) -> dict[int, Timing]:
    return {r.batch: Timing(r.median_s, r.iqr_s) for r in table.rows if r.model == model}


@dataclass(frozen=True)
class VariantFigures:
    """One timed variant: original / variant latency per batch size, MAC ratio (the limit), depth."""

    name: str
    speedups: dict[int, float]
    slower_at: list[int]            # batch sizes where it is slower than the original beyond noise
    mac_ratio: float                # original MACs / variant MACs
    depth: int
    same_as: str | None = None      # folds to the same model as that variant (timed once, as it)

    def to_dict(self) -> dict:
        return {"name": self.name, "speedups": {str(b): s for b, s in self.speedups.items()},
                "slower_at": list(self.slower_at), "mac_ratio": self.mac_ratio, "depth": self.depth,
                "same_as": self.same_as}


@dataclass(frozen=True)
class GuardReport:
    """What the guard measured and chose (``chosen`` is the variant written)."""

    planned: str
    chosen: str
    reason: str
    provider: str
    threads: int
    variants: list[VariantFigures]
    require_speedup: float | None = None

    def figures(self, name: str) -> VariantFigures:
        return next(v for v in self.variants if v.name == name)

    def to_dict(self) -> dict:
        return {"planned": self.planned, "chosen": self.chosen, "reason": self.reason, "provider": self.provider,
                "threads": self.threads, "require_speedup": self.require_speedup,
                "variants": [v.to_dict() for v in self.variants]}


def decide(table: LatencyTable, planned: str, names: list[str], require_speedup: float | None,
           fallback: bool) -> GuardDecision:
    """The guard's decision on measured ``table`` (original + ``names``, ``planned`` among them).

    Without ``fallback`` (an explicit merge mode) the planned variant is kept even when slower,
    unless ``require_speedup`` is not met."""
    original = timings(table, "original")
    decision = choose_variant(original, {n: timings(table, n) for n in names}, planned, require_speedup)
    if decision.chosen is None and not fallback and require_speedup is None:
        slower = ", ".join(map(str, decision.slower[planned]))
        return replace(decision, chosen=planned,
                       reason=f"{planned} (asked for) is slower than the original at batch {slower}: written anyway")
    return decision
