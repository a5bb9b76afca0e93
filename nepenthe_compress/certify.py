"""Certified neuron states: which recorded states a fold may rely on, and how sure it can be.

- **Margin.** A neuron recorded in one state on the calibration split is *certified* only when its
  extreme pre-activation stays clear of that state's boundary by at least ``margin`` times the
  neuron's own std (``margins``); a neuron inside the margin is treated as mixed (not linearised,
  its channel not dropped).
- **Held-out policy.** Certified neurons that take another state on the held-out split have
  *flipped*. Unless they are at most ``max_flip_rate`` of the neurons relied on, they are excluded
  too and the plan is recomputed (``certify``); the folded model must then meet the tolerance on
  the held-out split (checked by the fold's held-out check).
- **Evidence.** With zero flips in n independent observations, the flip probability p satisfies
  (1 - p)^n >= 1 - confidence, so p <= 1 - (1 - confidence)^(1/n), about 3/n at 95 % (the "rule of
  three", ``flip_bound``); per site with n = samples x positions, for the whole model with n = the
  input samples on which every relied-on state held.
- **New data.** ``check_relied`` compares the states a fold relied on (its report's
  ``certification.sites[*].states``) with those measured on any data, per site: neurons and
  elements that flipped, and the largest error the linear maps make there (``relied_error``).

Pure functions of ``EntropyReport`` / ``SiteStats`` and the activation registry (numpy).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from nepenthe_compress.entropy import EntropyReport, SiteStats
from nepenthe_compress.errors import UserError
from nepenthe_compress.sites import ActivationKind, Site

CONFIDENCE = 0.95
# Default --margin, in stds of the neuron's own pre-activation. Measured (benchmarks/certify.py): on
# random-weight torchvision ResNet-18 (3x32x32) and ResNet-50 (3x64x64) folded on 256 random inputs,
# margin 0 leaves folded outputs 5e-4 / 1e-4 off the original on fresh inputs, 0.25 still 1.9e-4 on
# ResNet-18, 0.5 and 1 within 2e-6 on both; 1 keeps fewer channels droppable (ResNet-50: 424 instead
# of 648) for no gain there. The shipped checkpoints fold the same at any of these margins.
DEFAULT_MARGIN = 0.5


def flip_bound(n: int, confidence: float = CONFIDENCE) -> float:
    """Upper confidence bound on a per-observation probability after ``n`` independent observations
    and no event: the p with (1 - p)^n = 1 - confidence, i.e. 1 - (1 - confidence)^(1/n) (about
    3/n at 95 %); 1 when nothing was observed."""
    if n <= 0:
        return 1.0
    return -math.expm1(math.log1p(-confidence) / n)


def boundary_distance(states: np.ndarray, thresholds: tuple[float, ...], low: np.ndarray,
                      high: np.ndarray) -> np.ndarray:
    """Per neuron, how far its recorded values stayed inside its recorded state (z units): two
    states (t): OFF t - max, ON min - t; three (lo, hi): OFF lo - max, LINEAR min(min - lo, hi - max),
    SATURATED min - hi. NaN for mixed neurons (state -1)."""
    d = np.full(len(states), np.nan)
    if len(thresholds) == 1:
        (t,) = thresholds
        distances = (t - high, low - t)
    else:
        lo, hi = thresholds
        distances = (lo - high, np.minimum(low - lo, hi - high), low - hi)
    for s, dist in enumerate(distances):
        d[states == s] = dist[states == s]
    return d


def margins(stats: SiteStats) -> np.ndarray | None:
    """Per neuron with one recorded state: its boundary distance in units of its std (inf when the
    pre-activation was constant, std 0); NaN for mixed neurons; None without moments."""
    m = stats.moments
    if m is None or not stats.thresholds:
        return None
    states = np.where(stats.one_state, stats.counts.argmax(axis=1), -1)
    d = boundary_distance(states, stats.thresholds, m.low, m.high)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(m.std > 0, d / np.where(m.std > 0, m.std, 1.0), np.where(d >= 0, np.inf, -np.inf))
    return np.where(states >= 0, out, np.nan)


def inside_margin(stats: SiteStats, margin: float) -> np.ndarray:
    """Neurons with one recorded state whose margin is below ``margin`` (none without moments)."""
    m = margins(stats)
    if m is None:
        return np.zeros(stats.neurons, dtype=bool)
    return stats.one_state & ~(m >= margin)


def flipped(calib: SiteStats, held: SiteStats) -> np.ndarray:
    """Neurons relied on (constant on ``calib``) whose state on ``held`` differs (or is mixed there);
    a site that did not run on ``held`` flips nothing."""
    if held.neurons != calib.neurons:
        return np.zeros(calib.neurons, dtype=bool)
    other = np.where(held.one_state, held.counts.argmax(axis=1), -1)
    return calib.constant_neurons & (other != calib.neuron_state)


def exclude(stats: SiteStats, mask: np.ndarray) -> SiteStats:
    """``stats`` with the neurons of ``mask`` marked uncertain as well."""
    before = np.zeros(stats.neurons, dtype=bool) if stats.uncertain is None else stats.uncertain
    return replace(stats, uncertain=before | mask)


@dataclass(frozen=True)
class SiteEvidence:
    """What a fold relies on at one site and how well it is supported."""

    name: str
    target: str
    relied: int              # neurons whose recorded state the fold may use
    observations: int        # per neuron: samples x positions over the calibration and held-out splits
    min_margin: float        # smallest margin (stds) of a relied-on neuron (inf: constant pre-activations)
    inside_margin: int       # one-state neurons not certified (inside the margin)
    flipped: int             # certified neurons that flipped on held-out data
    flips_kept: int          # ... of which the plan still relies on (--max-flip-rate)
    states: tuple[int, ...] = field(default=(), repr=False)   # per neuron: state relied on, -1 for none

    @property
    def flip_bound(self) -> float:
        """95 % upper bound on the per-element flip probability, given no flip in ``observations``."""
        return flip_bound(self.observations) if not self.flips_kept else 1.0

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target, "neurons_relied_on": self.relied,
                "observations": self.observations,
                "min_margin": None if math.isinf(self.min_margin) else self.min_margin,
                "inside_margin": self.inside_margin, "flipped_heldout": self.flipped,
                "flips_kept": self.flips_kept, "flip_bound": self.flip_bound, "states": list(self.states)}


@dataclass(frozen=True)
class Certification:
    """The states a fold may rely on (``states``: the calibration report with uncertain neurons
    marked) and the evidence for them."""

    states: EntropyReport
    margin: float
    max_flip_rate: float
    sites: list[SiteEvidence]
    samples: int                 # calibration + held-out inputs
    relied: int                  # certified neurons (before held-out exclusion)
    flipped: int                 # ... that flipped on held-out data
    excluded: bool               # the flipped neurons were excluded from the plan

    @property
    def flip_rate(self) -> float:
        return self.flipped / self.relied if self.relied else 0.0

    @property
    def inside_margin(self) -> int:
        return sum(s.inside_margin for s in self.sites)

    @property
    def input_bound(self) -> float | None:
        """95 % upper bound on the probability that a new input flips any relied-on state, given that
        none flipped on ``samples`` inputs; None when the plan keeps flipped neurons."""
        if self.flipped and not self.excluded:
            return None
        return flip_bound(self.samples)

    def to_dict(self) -> dict:
        return {"margin": self.margin, "confidence": CONFIDENCE, "max_flip_rate": self.max_flip_rate,
                "samples": self.samples, "neurons_certified": self.relied, "inside_margin": self.inside_margin,
                "flipped_heldout": self.flipped, "flip_rate": self.flip_rate, "flips_excluded": self.excluded,
                "input_flip_bound": self.input_bound, "sites": [s.to_dict() for s in self.sites]}


def certify(calib: EntropyReport, held: EntropyReport, margin: float = DEFAULT_MARGIN,
            max_flip_rate: float = 0.0) -> Certification:
    """The states a fold may rely on: neurons constant on ``calib`` and clear of their boundary by
    ``margin`` stds; of those, the ones that flip on ``held`` are excluded unless they are at most
    ``max_flip_rate`` of them."""
    held_by = held.by_name()
    certified = [exclude(s, inside_margin(s, margin)) for s in calib.sites]
    flips = {s.name: flipped(s, held_by[s.name]) if s.name in held_by else np.zeros(s.neurons, dtype=bool)
             for s in certified}
    relied = sum(int(s.constant_neurons.sum()) for s in certified)
    total_flips = sum(int(f.sum()) for f in flips.values())
    excluded = total_flips > max_flip_rate * relied
    plan = [exclude(s, flips[s.name]) if excluded else s for s in certified]
    evidence = []
    for before, after, measured in zip(certified, plan, calib.sites):
        held_site = held_by.get(before.name)
        n = before.elements + (held_site.elements if held_site is not None else 0)
        m = margins(after)
        used = after.constant_neurons
        smallest = float(np.min(m[used])) if m is not None and used.any() else math.inf
        f = int(flips[before.name].sum())
        evidence.append(SiteEvidence(before.name, before.target, int(used.sum()), n, smallest,
                                     int((measured.one_state & ~before.constant_neurons).sum()), f,
                                     0 if excluded else f, tuple(int(v) for v in after.neuron_state)))
    return Certification(replace(calib, sites=plan), margin, max_flip_rate, evidence,
                         calib.samples + held.samples, relied, total_flips, excluded)


# ---- checking relied-on states on new data (``verify``) ----------------------------------------------

def relied_error(kind: ActivationKind, params: dict, states: np.ndarray, low: np.ndarray,
                 high: np.ndarray) -> np.ndarray:
    """Per neuron relied on in state ``states[i]`` (-1: not relied on, error 0): the largest
    |act(z) - (a z + c)| over z in [low, high], the error the linear map of that state makes at the
    site on data whose pre-activation spans that range. The difference is piecewise linear in z, so
    its maximum lies at low, high or a state boundary between them."""
    n = len(states)
    maps = [tuple(t.numpy() for t in kind.affine(params, s, n)) for s in range(len(kind.states))]
    bounds = kind.thresholds(params)
    points = [low, high, *(np.clip(np.full(n, t), low, high) for t in bounds)]
    err = np.zeros(n)
    relied = states >= 0
    mine = np.where(relied, states, 0)
    a = np.choose(mine, [m[0] for m in maps])
    c = np.choose(mine, [m[1] for m in maps])
    for z in points:
        s = (z > bounds[0]).astype(int) if len(bounds) == 1 else np.where(z <= bounds[0], 0, np.where(z >= bounds[1], 2, 1))
        act = np.choose(s, [m[0] for m in maps]) * z + np.choose(s, [m[1] for m in maps])
        err = np.maximum(err, np.abs(act - (a * z + c)))
    return np.where(relied, err, 0.0)


@dataclass(frozen=True)
class SiteCheck:
    """The states a fold relied on at one site, checked on new data."""

    name: str
    target: str
    relied: int                # neurons relied on
    observations: int          # elements per neuron in the new data (samples x positions)
    flipped: int               # relied-on neurons seen in another state
    flipped_elements: int      # (neuron, element) pairs in another state
    max_abs_error: float       # largest |activation - its linear map| at the site on the data

    @property
    def element_flip_rate(self) -> float:
        return self.flipped_elements / (self.relied * self.observations) if self.relied and self.observations else 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target, "neurons_relied_on": self.relied,
                "observations": self.observations, "flipped": self.flipped, "flipped_elements": self.flipped_elements,
                "element_flip_rate": self.element_flip_rate, "max_abs_error": self.max_abs_error}


def check_relied(report: EntropyReport, sites: list[Site], relied: Mapping[str, Sequence[int]]) -> list[SiteCheck]:
    """Each site of ``relied`` (site name -> per-neuron state relied on, -1 for none) checked against
    the states measured in ``report`` (with moments) on new data; ``sites`` give each kind and
    parameters. ``UserError`` when a site is missing or its neuron count differs (another model)."""
    by_name, kinds = report.by_name(), {s.name: s for s in sites}
    checks = []
    for name, wanted in relied.items():
        stats, site = by_name.get(name), kinds.get(name)
        if stats is None or site is None or stats.neurons != len(wanted):
            found = "no such site" if stats is None else f"{stats.neurons} neurons, not {len(wanted)}"
            raise UserError(f"the fold report's site '{name}' does not match the reference model ({found}): "
                            "is it the checkpoint that was folded?")
        states = np.asarray(wanted, dtype=np.int64)
        used = states >= 0
        seen = stats.counts[np.arange(stats.neurons), np.where(used, states, 0)]
        off = np.where(used, stats.elements - seen, 0)
        m = stats.moments
        error = 0.0 if m is None or not used.any() else float(relied_error(site.kind, site.params, states, m.low, m.high).max())
        checks.append(SiteCheck(name, stats.target, int(used.sum()), stats.elements, int((off > 0).sum()),
                                int(off.sum()), error))
    return checks


def relied_states(report: Mapping, where: str) -> dict[str, list[int]]:
    """Site name -> per-neuron state relied on, from a fold report (``certification.sites[*].states``);
    only sites with a neuron relied on. ``UserError`` naming ``where`` when the report has none."""
    cert = report.get("certification") if isinstance(report, Mapping) else None
    sites = cert.get("sites") if isinstance(cert, Mapping) else None
    if not isinstance(sites, list):
        raise UserError(f"'{where}' is not a fold report with certified states (no certification.sites)")
    out: dict[str, list[int]] = {}
    for s in sites:
        states = s.get("states") if isinstance(s, Mapping) else None
        name = s.get("name") if isinstance(s, Mapping) else None
        if not isinstance(name, str) or not isinstance(states, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and -1 <= v <= 2 for v in states):
            raise UserError(f"'{where}': malformed certification site entry {str(s)[:80]}")
        if any(v >= 0 for v in states):
            out[name] = states
    return out
