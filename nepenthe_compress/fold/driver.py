"""The fold pass: from measured neuron states to a folded (shallower) GraphModule.

    trace -> record shapes -> find sites -> run the rewrite registry to a fixpoint

``run_rewrites`` is the driver: it runs the first rewrite of the registry that changes the graph
and starts again from the top, until no rewrite changes anything (see ``fold.rewrites``).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from nepenthe_compress.entropy import EntropyReport
from nepenthe_compress.fold.cost import AnalyticCost, CostModel
from nepenthe_compress.fold.protocol import Rewrite
from nepenthe_compress.fold.rewriter import MERGE_MODES, FoldEvent, FoldOptions, GraphRewriter
from nepenthe_compress.fold.rewrites import REWRITES
from nepenthe_compress.fold.rewrites.channels import kept_for_alignment
from nepenthe_compress.sites import find_sites
from nepenthe_compress.trace import propagate_shapes, trace_model

SWEEPS_PER_NODE = 20   # generous bound on graph-changing sweeps (each makes at least one change)


@dataclass
class FoldedModel:
    model: fx.GraphModule
    events: list[FoldEvent]
    sites_total: int
    linearised: list[str]        # site names replaced by linear maps
    channels_dropped: int
    channels_kept_for_alignment: int = 0  # droppable channels kept so counts stay aligned

    def count(self, action: str) -> int:
        return sum(e.action == action for e in self.events)


def run_rewrites(rw: GraphRewriter, rewrites: Sequence[Rewrite] = REWRITES) -> int:
    """Run ``rewrites`` (priority order) on ``rw`` until none changes the graph; returns the number
    of graph-changing sweeps. More than ``SWEEPS_PER_NODE`` per node means a rewrite keeps undoing
    another: an internal error."""
    active = [r for r in rewrites if r.enabled(rw.options)]
    limit = SWEEPS_PER_NODE * (len(rw.gm.graph.nodes) + 1)
    for sweeps in range(limit + 1):
        for rewrite in active:
            if rewrite.sweep(rw):
                rw.settle()
                break
        else:
            return sweeps
    raise RuntimeError(f"internal error: the fold rewrites did not reach a fixpoint in {limit} sweeps "
                       f"(last: {rw.log[-1].action if rw.log else 'none'})")


def fold_model(model: nn.Module, report: EntropyReport, example: Tensor,
               options: FoldOptions = FoldOptions(), leaf_modules: Iterable[type | str] = (),
               cost: CostModel = AnalyticCost(), rewrites: Sequence[Rewrite] = REWRITES) -> FoldedModel:
    """Fold ``model`` given the neuron states of ``report`` (measured on the same architecture).

    ``example`` fixes the input size (border bias maps are exact for that size only); ``cost``
    prices merge candidates (``--merge auto``; it breaks ties under ``all``).
    """
    if options.merge not in MERGE_MODES:
        raise ValueError(f"merge must be auto, all or none, not {options.merge!r}")
    gm = trace_model(model, leaf_modules)
    propagate_shapes(gm, example)
    sites = find_sites(gm)
    rw = GraphRewriter(gm, options, example, sites, report.by_name(), cost)
    with torch.no_grad():
        run_rewrites(rw, rewrites)
    return FoldedModel(rw.finish(), rw.log, len(sites), rw.linearised, rw.channels_dropped,
                       kept_for_alignment(rw))
