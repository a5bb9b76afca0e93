"""Neuron-state counting and layer entropy (docs/DESIGN.md 2; the papers' eq. 1-3 and 5).

Counters only: for each site an int64 ``[neurons, states]`` table of how many (sample, position)
elements each neuron spent in each state. Batches are streamed; memory is O(neurons).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, fx, nn

from nepenthe_compress.errors import DataError
from nepenthe_compress.sites import Site, find_sites
from nepenthe_compress.trace import trace_model


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
    def constant_neurons(self) -> np.ndarray:
        """True for neurons that stayed in one state on every element seen."""
        return (self.counts > 0).sum(axis=1) == 1

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

    def to_dict(self, with_counts: bool = False) -> dict:
        d = {"name": self.name, "target": self.target, "kind": self.kind,
             "neuron_axis": self.neuron_axis, "neurons": self.neurons, "states": list(self.states),
             "always": self.always(), "mixed": self.mixed, "entropy": self.entropy,
             "entropy_mixed_mean": self.entropy_mixed, "zero_entropy": self.zero_entropy, "exact": self.exact}
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
    elements seen per neuron; the ``[neurons, states]`` table is only built when read.
    """

    def __init__(self, thresholds: tuple[float, ...], axis: int) -> None:
        super().__init__()
        self.thresholds = thresholds
        self.axis = axis
        self.hits: list[Tensor] | None = None  # per threshold: int64 [neurons]
        self.seen = 0                          # elements per neuron

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

    @property
    def counts(self) -> Tensor | None:
        """int64 ``[neurons, states]``: (OFF, ON) or (OFF, LINEAR, SATURATED); None before any batch."""
        if self.hits is None:
            return None
        if len(self.hits) == 1:
            return torch.stack([self.seen - self.hits[0], self.hits[0]], dim=1)
        low, high = self.hits
        return torch.stack([low, self.seen - low - high, high], dim=1)


def _per_neuron(mask: Tensor) -> Tensor:
    """Count of True per neuron of a bool ``[outer, neurons, inner]`` mask.

    The contiguous inner axis is reduced first, then the outer one, in int32 whenever the batch
    allows: on CPU much faster than one int64 reduction over non-adjacent axes.
    """
    acc = torch.int32 if mask.numel() < 2**31 else torch.int64
    if mask.shape[2] == 1:
        return mask[:, :, 0].sum(0, dtype=acc)
    return mask.sum(2, dtype=acc).sum(0, dtype=acc)


def instrument(gm: fx.GraphModule, sites: list[Site]) -> dict[str, StateCounter]:
    """Insert a ``StateCounter`` before every site (in place); returns them by site name."""
    probes: dict[str, StateCounter] = {}
    for i, site in enumerate(sites):
        probe = StateCounter(site.kind.thresholds(site.params), site.neuron_axis)
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
    """

    def __init__(self, model: nn.Module, leaf_modules: Iterable[type | str] = ()) -> None:
        self.gm = trace_model(model, leaf_modules)
        self.sites = find_sites(self.gm)
        self.probes = instrument(self.gm, self.sites)
        self.device = next((p.device for p in self.gm.parameters()), torch.device("cpu"))
        self.samples = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Run one batch (eval mode) and add its neuron states to the counters."""
        self.gm(x.to(self.device))
        self.samples += x.shape[0]

    def report(self, reduce: Callable[[Tensor], Tensor] | None = None) -> EntropyReport:
        """The counts so far; ``reduce`` maps each int64 table and the sample count (e.g. all-reduce)."""
        if self.samples == 0:
            raise DataError("no calibration samples: the data source is empty")
        reduce = reduce or (lambda t: t)
        samples = int(reduce(torch.tensor(self.samples, dtype=torch.int64, device=self.device)).item())
        stats = []
        for site in self.sites:
            counts = self.probes[site.name].counts
            if counts is None:  # the site never ran (e.g. a branch not taken)
                counts = torch.zeros(0, len(site.kind.states), dtype=torch.int64, device=self.device)
            stats.append(SiteStats(site.name, site.target, site.kind.name, site.neuron_axis,
                                   site.kind.states, reduce(counts).cpu().numpy().astype(np.int64),
                                   site.kind.exact))
        return EntropyReport(stats, samples)


def measure_entropy(model: nn.Module, batches: Iterable[Tensor], *, progress: bool = False,
                    reduce: Callable[[Tensor], Tensor] | None = None,
                    leaf_modules: Iterable[type | str] = ()) -> EntropyReport:
    """Count neuron states of every rectifier site of ``model`` over ``batches`` (eval mode).

    ``reduce`` is applied to each int64 count table before the report is built (e.g. a
    distributed all-reduce SUM), and to the sample count.
    """
    meter = EntropyMeter(model, leaf_modules)
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
