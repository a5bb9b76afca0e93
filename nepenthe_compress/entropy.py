"""Neuron-state counting and layer entropy (docs/DESIGN.md 2; the papers' eq. 1-3 and 5).

Counters only: for each site an int64 ``[neurons, states]`` table of how many (sample, position)
elements each neuron spent in each state and, per neuron, the min, max, mean and std of its
pre-activation (float64 accumulators: how far each neuron stayed from its state boundaries, see
``certify``). Batches are streamed; memory is O(neurons).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, fx, nn

from nepenthe_compress.errors import DataError
from nepenthe_compress.sites import Site, find_sites
from nepenthe_compress.trace import trace_model


@dataclass(frozen=True)
class NeuronMoments:
    """Per neuron, over every element seen: min, max, mean and std (population) of the
    pre-activation, float64 ``[neurons]`` each."""

    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def select(self, keep: np.ndarray) -> NeuronMoments:
        return NeuronMoments(self.low[keep], self.high[keep], self.mean[keep], self.std[keep])


@dataclass
class SiteStats:
    """Counts and entropy of one activation site."""

    name: str
    target: str
    kind: str
    neuron_axis: int
    states: tuple[str, ...]
    counts: np.ndarray  # int64 [neurons, len(states)]
    exact: bool = True  # False for smooth rectifiers (linearisation approximate)
    thresholds: tuple[float, ...] = ()       # state boundaries in z: (t,) or (lo, hi)
    moments: NeuronMoments | None = None     # None when not measured (e.g. a distributed reduce)
    # bool [neurons]: neurons with one recorded state the fold must not rely on (inside the margin,
    # or flipped on held-out data); they count as mixed. None: every one-state neuron is relied on.
    uncertain: np.ndarray | None = None

    @property
    def neurons(self) -> int:
        return int(self.counts.shape[0])

    @property
    def elements(self) -> int:
        """Elements seen per neuron."""
        return int(self.counts[0].sum()) if self.neurons else 0

    @property
    def entropy_per_neuron(self) -> np.ndarray:
        """H(i) = -sum_s p_s log2 p_s in bits, float64."""
        c = self.counts.astype(np.float64)
        p = c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, -p * np.log2(p), 0.0)
        return terms.sum(axis=1)

    @property
    def entropy(self) -> float:
        """Layer entropy: mean neuron entropy over all neurons (eq. 5)."""
        return float(self.entropy_per_neuron.mean()) if self.neurons else 0.0

    @property
    def entropy_mixed(self) -> float:
        """Mean neuron entropy over the mixed (non-constant) neurons only, as EGP reports it; 0 when
        none is mixed. Equals ``entropy * neurons / mixed``: larger on partly constant sites."""
        h = self.entropy_per_neuron[~self.constant_neurons]
        return float(h.mean()) if h.size else 0.0

    @property
    def one_state(self) -> np.ndarray:
        """True for neurons that stayed in one state on every element seen."""
        return (self.counts > 0).sum(axis=1) == 1

    @property
    def constant_neurons(self) -> np.ndarray:
        """Neurons in one state on every element seen and not marked ``uncertain``."""
        return self.one_state if self.uncertain is None else self.one_state & ~self.uncertain

    @property
    def zero_entropy(self) -> bool:
        return self.elements > 0 and bool(self.constant_neurons.all())

    @property
    def neuron_state(self) -> np.ndarray:
        """State index of each neuron, -1 where it was mixed."""
        return np.where(self.constant_neurons, self.counts.argmax(axis=1), -1)

    def always(self) -> dict[str, int]:
        """Number of neurons that were always in each state."""
        st = self.neuron_state
        return {s: int((st == i).sum()) for i, s in enumerate(self.states)}

    @property
    def mixed(self) -> int:
        return int((self.neuron_state == -1).sum())

    def select(self, keep: np.ndarray) -> SiteStats:
        """The stats of the neurons where ``keep`` (bool or indices) holds."""
        return replace(self, counts=self.counts[keep],
                       moments=None if self.moments is None else self.moments.select(keep),
                       uncertain=None if self.uncertain is None else self.uncertain[keep])

    def to_dict(self, with_counts: bool = False) -> dict:
        d = {"name": self.name, "target": self.target, "kind": self.kind,
             "neuron_axis": self.neuron_axis, "neurons": self.neurons, "states": list(self.states),
             "always": self.always(), "mixed": self.mixed, "entropy": self.entropy,
             "entropy_mixed_mean": self.entropy_mixed, "zero_entropy": self.zero_entropy, "exact": self.exact,
             "observations": self.elements}
        if with_counts:
            d["counts"] = self.counts.tolist()
        return d


@dataclass
class EntropyReport:
    sites: list[SiteStats]
    samples: int

    @property
    def zero_entropy_sites(self) -> list[SiteStats]:
        return [s for s in self.sites if s.zero_entropy]

    def by_name(self) -> dict[str, SiteStats]:
        return {s.name: s for s in self.sites}

    def to_dict(self, with_counts: bool = False) -> dict:
        return {"samples": self.samples,
                "zero_entropy_sites": len(self.zero_entropy_sites),
                "total_sites": len(self.sites),
                "sites": [s.to_dict(with_counts) for s in self.sites]}


class StateCounter(nn.Module):
    """Probe inserted before a site: counts, per neuron, the elements of z in each state.

    Per batch it keeps one int64 vector per threshold (elements beyond it) and the number of
    elements seen per neuron; the ``[neurons, states]`` table is only built when read. With
    ``moments`` it also keeps per neuron the min, max, sum and sum of squares of z (float64).
    """

    def __init__(self, thresholds: tuple[float, ...], axis: int, moments: bool = True) -> None:
        super().__init__()
        self.thresholds = thresholds
        self.axis = axis
        self.hits: list[Tensor] | None = None  # per threshold: int64 [neurons]
        self.seen = 0                          # elements per neuron
        self.sums: MomentSums | None = MomentSums() if moments else None

    def forward(self, z: Tensor) -> None:
        axis = self.axis % z.dim()
        shape = (math.prod(z.shape[:axis]), z.shape[axis], math.prod(z.shape[axis + 1:]))
        if len(self.thresholds) == 1:
            masks = (z > self.thresholds[0],)
        else:
            masks = (z <= self.thresholds[0], z >= self.thresholds[1])
        hits = [_per_neuron(m.reshape(shape)) for m in masks]
        if self.hits is None:
            self.hits = [h.to(torch.int64) for h in hits]
        else:
            for acc, h in zip(self.hits, hits):
                acc += h
        self.seen += shape[0] * shape[2]
        if self.sums is not None:
            self.sums.add(z.reshape(shape))

    @property
    def counts(self) -> Tensor | None:
        """int64 ``[neurons, states]``: (OFF, ON) or (OFF, LINEAR, SATURATED); None before any batch."""
        if self.hits is None:
            return None
        if len(self.hits) == 1:
            return torch.stack([self.seen - self.hits[0], self.hits[0]], dim=1)
        low, high = self.hits
        return torch.stack([low, self.seen - low - high, high], dim=1)


class MomentSums:
    """Running per-neuron min, max, sum and sum of squares of ``[outer, neurons, inner]`` batches.

    Min and max are exact; sums are taken per batch in the data's precision and accumulated in
    float64, so the std is accurate where it matters (a neuron near a boundary has |mean| of the
    order of its std; for |mean| >> std the std may be overestimated, which only makes a margin
    look smaller, never larger, than it is).
    """

    def __init__(self) -> None:
        self.low: Tensor | None = None
        self.high: Tensor | None = None
        self.total: Tensor | None = None
        self.squares: Tensor | None = None
        self.n = 0

    def add(self, z: Tensor) -> None:
        low, high = z.amin(2).amin(0).double(), z.amax(2).amax(0).double()
        total = z.sum(2).double().sum(0)
        squares = (torch.linalg.vector_norm(z, dim=2).double() ** 2).sum(0)
        if self.low is None:
            self.low, self.high, self.total, self.squares = low, high, total, squares
        else:
            torch.minimum(self.low, low, out=self.low)
            torch.maximum(self.high, high, out=self.high)
            self.total += total
            self.squares += squares
        self.n += z.shape[0] * z.shape[2]

    def moments(self) -> NeuronMoments | None:
        if self.low is None or self.n == 0:
            return None
        mean = self.total / self.n
        var = (self.squares / self.n - mean * mean).clamp_min(0.0)
        arrays = (t.cpu().numpy().astype(np.float64) for t in (self.low, self.high, mean, var.sqrt()))
        return NeuronMoments(*arrays)


def _per_neuron(mask: Tensor) -> Tensor:
    """Count of True per neuron of a bool ``[outer, neurons, inner]`` mask.

    The contiguous inner axis is reduced first, then the outer one, in int32 whenever the batch
    allows: on CPU much faster than one int64 reduction over non-adjacent axes.
    """
    acc = torch.int32 if mask.numel() < 2**31 else torch.int64
    if mask.shape[2] == 1:
        return mask[:, :, 0].sum(0, dtype=acc)
    return mask.sum(2, dtype=acc).sum(0, dtype=acc)


def instrument(gm: fx.GraphModule, sites: list[Site], moments: bool = True) -> dict[str, StateCounter]:
    """Insert a ``StateCounter`` before every site (in place); returns them by site name."""
    probes: dict[str, StateCounter] = {}
    for i, site in enumerate(sites):
        probe = StateCounter(site.kind.thresholds(site.params), site.neuron_axis, moments)
        attr = f"_nc_probe_{i}"
        gm.add_submodule(attr, probe)
        with gm.graph.inserting_before(site.node):
            gm.graph.call_module(attr, (site.input,))
        probes[site.name] = probe
    gm.recompile()
    return probes


class EntropyMeter:
    """A traced, instrumented copy of a model: feed it batches, then read the report.

    Building it (tracing) and streaming batches are separate so their costs can be told apart.
    ``moments``: also record each neuron's min / max / mean / std (margins, see ``certify``).
    """

    def __init__(self, model: nn.Module, leaf_modules: Iterable[type | str] = (), moments: bool = False) -> None:
        self.gm = trace_model(model, leaf_modules)
        self.sites = find_sites(self.gm)
        self.probes = instrument(self.gm, self.sites, moments)
        self.device = next((p.device for p in self.gm.parameters()), torch.device("cpu"))
        self.samples = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Run one batch (eval mode) and add its neuron states to the counters."""
        self.gm(x.to(self.device))
        self.samples += x.shape[0]

    def report(self, reduce: Callable[[Tensor], Tensor] | None = None) -> EntropyReport:
        """The counts so far; ``reduce`` maps each int64 table and the sample count (e.g. all-reduce
        SUM); the moments are local, so a reduced report has none."""
        if self.samples == 0:
            raise DataError("no calibration samples: the data source is empty")
        reduced = reduce is not None
        reduce = reduce or (lambda t: t)
        samples = int(reduce(torch.tensor(self.samples, dtype=torch.int64, device=self.device)).item())
        stats = []
        for site in self.sites:
            probe = self.probes[site.name]
            counts = probe.counts
            if counts is None:  # the site never ran (e.g. a branch not taken)
                counts = torch.zeros(0, len(site.kind.states), dtype=torch.int64, device=self.device)
            moments = None if probe.sums is None or reduced else probe.sums.moments()
            stats.append(SiteStats(site.name, site.target, site.kind.name, site.neuron_axis,
                                   site.kind.states, reduce(counts).cpu().numpy().astype(np.int64),
                                   site.kind.exact, tuple(float(t) for t in probe.thresholds), moments))
        return EntropyReport(stats, samples)


def measure_entropy(model: nn.Module, batches: Iterable[Tensor], *, progress: bool = False,
                    reduce: Callable[[Tensor], Tensor] | None = None,
                    leaf_modules: Iterable[type | str] = (), moments: bool = False) -> EntropyReport:
    """Count neuron states of every rectifier site of ``model`` over ``batches`` (eval mode).

    ``reduce`` is applied to each int64 count table before the report is built (e.g. a
    distributed all-reduce SUM), and to the sample count. ``moments`` also records each neuron's
    min / max / mean / std of the pre-activation (margins, see ``certify``; about twice the probes'
    cost, so off by default; never kept under a ``reduce``).
    """
    meter = EntropyMeter(model, leaf_modules, moments)
    for x in _progress(batches, progress):
        meter.update(x)
    return meter.report(reduce)


def _progress(batches: Iterable[Tensor], enabled: bool) -> Iterable[Tensor]:
    if not enabled:
        return batches
    from rich.console import Console
    from rich.progress import track

    total = len(batches) if hasattr(batches, "__len__") else None
    return track(batches, description="measuring neuron states", total=total, transient=True,
                 console=Console(stderr=True))
