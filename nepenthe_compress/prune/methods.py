"""What each pruning method does in one round (docs/DESIGN.md 3): a registry of step functions.

A step looks at the model after the previous round (weights, masks, entropy of its live sites) and
returns a ``Step`` (sites to linearise, weights to remove per layer) or None when nothing is left.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx
from torch import Tensor

from nepenthe_compress.entropy import EntropyReport
from nepenthe_compress.prune.budget import global_magnitude_counts, nepenthe_budget, prune_amount, target_cap
from nepenthe_compress.prune.catalog import METHOD_SUMMARIES
from nepenthe_compress.prune.masks import sparsity, surviving, weight_name


@dataclass
class PruneState:
    """The model between rounds."""

    gm: fx.GraphModule                  # original site names; linearised sites removed
    masks: dict[str, Tensor]            # weight name -> bool (covers every considered layer)
    linearised: list[str]               # site names replaced by identity so far
    layer_sites: dict[str, list[str]]   # considered layer -> sites it feeds (original graph)
    report: EntropyReport | None = None  # entropy of gm's live sites after the last round

    @property
    def considered(self) -> list[str]:
        return [weight_name(layer) for layer in self.layer_sites]

    def nonzero(self, name: str) -> int:
        return int(self.masks[name].sum())

    def sparsity(self) -> float:
        """Fraction of the considered layers' weights that are pruned."""
        return sparsity({n: self.masks[n] for n in self.considered})


@dataclass(frozen=True)
class MethodOptions:
    zeta: float = 0.5
    target_sparsity: float | None = None


@dataclass(frozen=True)
class Step:
    action: str                                            # what was done, for humans
    linearise: list[str] = field(default_factory=list)     # site names
    prune: dict[str, int] = field(default_factory=dict)    # weight name -> weights to remove


def _cap(state: PruneState, opts: MethodOptions) -> int | None:
    names = state.considered
    return target_cap(sum(state.nonzero(n) for n in names), sum(state.masks[n].numel() for n in names),
                      opts.target_sparsity)


def target_reached(state: PruneState, opts: MethodOptions) -> bool:
    """True once no weight may go without exceeding the sparsity target."""
    return _cap(state, opts) == 0


def imp_step(state: PruneState, opts: MethodOptions) -> Step | None:
    """Remove ``zeta`` of the remaining considered weights by one global magnitude threshold."""
    names = state.considered
    k = prune_amount(opts.zeta, sum(state.nonzero(n) for n in names), _cap(state, opts))
    if k == 0:
        return None
    counts = global_magnitude_counts([surviving(state.gm, state.masks, n) for n in names], k)
    return Step(f"pruned {k} weights (global magnitude)", prune=dict(zip(names, counts.tolist())))


def nepenthe_step(state: PruneState, opts: MethodOptions) -> Step | None:
    """Linearise zero-entropy sites; spread ``zeta`` of the rest's weights by the EGP budget."""
    zero = [s.name for s in state.report.sites if s.zero_entropy]
    live = {s.name: s.entropy for s in state.report.sites if not s.zero_entropy}
    layers = [layer for layer, sites in state.layer_sites.items()
              if any(s in live for s in sites) and state.nonzero(weight_name(layer)) > 0]
    names = [weight_name(layer) for layer in layers]
    remaining = [state.nonzero(n) for n in names]
    total = prune_amount(opts.zeta, sum(remaining), _cap(state, opts))
    if total == 0 and not zero:
        return None
    entropies = [float(np.mean([live[s] for s in state.layer_sites[layer] if s in live])) for layer in layers]
    mean_abs = [float(surviving(state.gm, state.masks, n).mean()) for n in names]
    counts = nepenthe_budget(total, entropies, mean_abs, remaining)
    done = ([f"linearised {len(zero)} zero-entropy site(s)"] if zero else []) + \
           ([f"pruned {int(counts.sum())} weights (entropy budget)"] if total else [])
    return Step(", ".join(done), linearise=zero, prune=dict(zip(names, counts.tolist())))


def easier_step(state: PruneState, opts: MethodOptions) -> Step | None:
    """Linearise the lowest-entropy live site (the first one on ties)."""
    if not state.report.sites:
        return None
    site = min(state.report.sites, key=lambda s: s.entropy)
    return Step(f"linearised {site.name} ({site.entropy:.3f} bits)", linearise=[site.name])


@dataclass(frozen=True)
class Method:
    name: str
    step: Callable[[PruneState, MethodOptions], Step | None]
    prunes_weights: bool    # sparsity target applies
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("nepenthe", nepenthe_step, True, METHOD_SUMMARIES["nepenthe"]),
    Method("imp", imp_step, True, METHOD_SUMMARIES["imp"]),
    Method("easier", easier_step, False, METHOD_SUMMARIES["easier"]),
)}
