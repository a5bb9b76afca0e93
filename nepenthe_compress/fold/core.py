"""The fold pass: from measured neuron states to a folded (shallower) GraphModule.

    linearise zero-entropy sites -> fold BN / affine maps into neighbours, merge residual branches
    -> propagate constants (layers pruned to zero) -> drop constant channels -> merge linear chains (cost model) -> repeat until nothing changes
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from nepenthe_compress.entropy import EntropyReport
from nepenthe_compress.fold.chains import merge_chains
from nepenthe_compress.fold.channels import ChannelDrops, drop_constant_channels
from nepenthe_compress.fold.constants import propagate_constants
from nepenthe_compress.fold.graph import FoldEvent, FoldGraph, FoldOptions
from nepenthe_compress.fold.rules import apply_rules, linearise_sites
from nepenthe_compress.sites import find_sites
from nepenthe_compress.trace import propagate_shapes, trace_model


@dataclass
class FoldedGraph:
    model: fx.GraphModule
    events: list[FoldEvent]
    sites_total: int
    linearised: list[str]        # site names replaced by linear maps
    channels_dropped: int
    channels_kept_for_alignment: int = 0  # droppable channels kept so counts stay aligned

    def count(self, action: str) -> int:
        return sum(e.action == action for e in self.events)


def fold_graph(model: nn.Module, report: EntropyReport, example: Tensor,
               options: FoldOptions = FoldOptions(), leaf_modules: Iterable[type | str] = ()
               ) -> FoldedGraph:
    """Fold ``model`` given the neuron states of ``report`` (measured on the same architecture).

    ``example`` fixes the input size (border bias maps are exact for that size only).
    """
    if options.merge not in ("auto", "all", "none"):
        raise ValueError(f"merge must be auto, all or none, not {options.merge!r}")
    gm = trace_model(model, leaf_modules)
    propagate_shapes(gm, example)
    sites = find_sites(gm)
    stats = report.by_name()
    fg = FoldGraph(gm, options)
    linearised = linearise_sites(fg, sites, stats)
    dropped = kept = 0
    with torch.no_grad():
        for _ in range(3):  # later rounds catch folds enabled by earlier drops and merges
            events = len(fg.log)
            apply_rules(fg)
            if propagate_constants(fg):
                apply_rules(fg)
            drops = drop_constant_channels(fg, stats) if options.drop_channels else ChannelDrops()
            kept = drops.kept_for_alignment  # the graph's state, not a sum over rounds
            if drops.dropped:
                dropped += drops.dropped
                fg.gm.recompile()
                propagate_shapes(fg.gm, example)
            merge_chains(fg)
            apply_rules(fg)
            if len(fg.log) == events:
                break
    return FoldedGraph(fg.finish(), fg.log, len(sites), linearised, dropped, kept)
