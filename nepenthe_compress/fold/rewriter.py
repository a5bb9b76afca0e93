"""The graph being folded: a GraphModule with its recorded shapes, the measured neuron states, the
options and cost model of the fold, and the log of what every rewrite did (and skipped, and why)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from nepenthe_compress.entropy import SiteStats
from nepenthe_compress.fold import cost as C
from nepenthe_compress.fold import ops
from nepenthe_compress.fold.ops import Shape, Spec
from nepenthe_compress.sites import Site
from nepenthe_compress.trace import propagate_shapes, shape_of

MERGE_MODES = ("auto", "all", "none")


@dataclass(frozen=True)
class FoldOptions:
    merge: str = "auto"            # auto | all | none (docs/DESIGN.md 4.2)
    allow_inexact: bool = False    # make border-inexact conv merges (error is measured and reported)
    approximate: bool = False      # linearise smooth rectifiers (GELU, SiLU, ...): approximate
    drop_channels: bool = True     # remove dead (always-OFF) and constant channels
    channel_align: int = 8         # channel counts left by drops stay multiples of this (1: drop all)

    def __post_init__(self) -> None:
        if self.channel_align < 1:
            raise ValueError(f"channel_align must be >= 1, not {self.channel_align}")


@dataclass
class FoldEvent:
    action: str   # linearise | fold | constant | merge | drop | skip
    where: str
    detail: str

    def to_dict(self) -> dict:
        return {"action": self.action, "where": self.where, "detail": self.detail}


@dataclass
class GraphRewriter:
    """A GraphModule being rewritten in place, with everything the rewrites read and record."""

    gm: fx.GraphModule
    options: FoldOptions = FoldOptions()
    example: Tensor | None = None             # input the recorded shapes are for
    sites: list[Site] = field(default_factory=list)
    stats: dict[str, SiteStats] = field(default_factory=dict)   # by site name; sliced with drops
    cost: C.CostModel = C.AnalyticCost()
    log: list[FoldEvent] = field(default_factory=list)
    linearised: list[str] = field(default_factory=list)        # site names replaced by linear maps
    channels_dropped: int = 0
    shapes_stale: bool = False                # a rewrite changed channel counts
    _counter: int = 0
    _skipped: set = field(default_factory=set)

    # ---- reading ----

    def module(self, node: fx.Node) -> nn.Module | None:
        return ops.module(self.gm, node)

    def nodes(self) -> Iterator[fx.Node]:
        """The graph's nodes in order, skipping any erased while the caller iterates."""
        for node in list(self.gm.graph.nodes):
            if not getattr(node, "_erased", False):
                yield node

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype (new constants and buffers are stored in it)."""
        return next((p.dtype for p in self.gm.parameters() if p.is_floating_point()), torch.float32)

    def shape(self, node: fx.Node) -> torch.Size:
        shape = shape_of(node)
        if shape is None:
            raise RuntimeError(f"no recorded shape for node {node.name}")
        return shape

    def label(self, node: fx.Node) -> str:
        return str(node.meta.get("nc_label", node.target if node.op == "call_module" else node.name))

    # ---- pricing (the one cost hook) ----

    def price(self, spec: Spec, in_shape: Shape) -> float:
        return C.price(self.cost, self.options.merge, spec, in_shape)

    def pays(self, merged: Spec, parts: Sequence[Spec], in_shape: Shape) -> bool:
        return C.pays(self.cost, self.options.merge, merged, parts, in_shape)

    # ---- writing ----

    def record(self, action: str, where: str, detail: str) -> None:
        if action == "skip":  # report each skip once
            if (where, detail) in self._skipped:
                return
            self._skipped.add((where, detail))
        self.log.append(FoldEvent(action, where, detail))

    def set_module(self, node: fx.Node, module: nn.Module, label: str | None = None) -> None:
        """Point ``node`` at a new submodule (never mutates a possibly shared module)."""
        node.meta.setdefault("nc_label", label or self.label(node))
        node.target = self._add(module)

    def insert_module(self, before: fx.Node, module: nn.Module, arg: fx.Node, label: str) -> fx.Node:
        """New call_module node running ``module`` on ``arg``, placed before (and meant to replace)
        ``before``, whose output shape it takes."""
        name = self._add(module)
        with self.gm.graph.inserting_before(before):
            new = self.gm.graph.call_module(name, (arg,))
        new.meta = dict(before.meta)
        new.meta["nc_label"] = label
        return new

    def _add(self, module: nn.Module) -> str:
        self._counter += 1
        name = f"nc_folded_{self._counter}"
        self.gm.add_submodule(name, module)
        return name

    def bypass(self, node: fx.Node, replacement: fx.Node) -> None:
        """Replace ``node`` by ``replacement`` and erase whatever is left without users."""
        node.replace_all_uses_with(replacement)
        self.gm.graph.erase_node(node)
        self.gm.graph.eliminate_dead_code()

    def settle(self) -> None:
        """Re-record shapes after a rewrite that changed channel counts."""
        if self.shapes_stale:
            self.gm.recompile()
            propagate_shapes(self.gm, self.example)
            self.shapes_stale = False

    def finish(self) -> fx.GraphModule:
        self.gm.graph.eliminate_dead_code()
        self.gm.delete_all_unused_submodules()
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm
