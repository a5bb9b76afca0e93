"""Graph bookkeeping shared by the fold rewrites: node classification, module replacement, log."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from nepenthe_compress.fold.modules import ChannelAffine, MapConv2d
from nepenthe_compress.trace import shape_of

ADD_FUNCTIONS = (operator.add, torch.add)


@dataclass(frozen=True)
class FoldOptions:
    merge: str = "auto"            # auto | all | none (DESIGN 4.2)
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
class FoldGraph:
    """A GraphModule being folded, with its recorded shapes and the log of what was done."""

    gm: fx.GraphModule
    options: FoldOptions
    log: list[FoldEvent] = field(default_factory=list)
    _counter: int = 0
    _skipped: set = field(default_factory=set)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype (new constants and buffers are stored in it)."""
        return next((p.dtype for p in self.gm.parameters() if p.is_floating_point()), torch.float32)

    def shape(self, node: fx.Node) -> torch.Size:
        shape = shape_of(node)
        if shape is None:
            raise RuntimeError(f"no recorded shape for node {node.name}")
        return shape

    def record(self, action: str, where: str, detail: str) -> None:
        if action == "skip":  # report each skip once
            if (where, detail) in self._skipped:
                return
            self._skipped.add((where, detail))
        self.log.append(FoldEvent(action, where, detail))

    def label(self, node: fx.Node) -> str:
        return str(node.meta.get("nc_label", node.target if node.op == "call_module" else node.name))

    def set_module(self, node: fx.Node, module: nn.Module, label: str | None = None) -> None:
        """Point ``node`` at a new submodule (never mutates a possibly shared module)."""
        self._counter += 1
        name = f"nc_folded_{self._counter}"
        self.gm.add_submodule(name, module)
        node.meta.setdefault("nc_label", label or self.label(node))
        node.target = name

    def insert_module(self, before: fx.Node, module: nn.Module, arg: fx.Node, label: str) -> fx.Node:
        """New call_module node running ``module`` on ``arg``, placed before (and meant to replace)
        ``before``, whose output shape it takes."""
        self._counter += 1
        name = f"nc_folded_{self._counter}"
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_before(before):
            new = self.gm.graph.call_module(name, (arg,))
        new.meta = dict(before.meta)
        new.meta["nc_label"] = label
        return new

    def bypass(self, node: fx.Node, replacement: fx.Node) -> None:
        """Replace ``node`` by ``replacement`` and erase whatever is left without users."""
        node.replace_all_uses_with(replacement)
        self.gm.graph.erase_node(node)
        self.gm.graph.eliminate_dead_code()

    def finish(self) -> fx.GraphModule:
        self.gm.graph.eliminate_dead_code()
        self.gm.delete_all_unused_submodules()
        self.gm.graph.lint()
        self.gm.recompile()
        return self.gm


# ---- node kinds ---------------------------------------------------------------------------------

def is_conv2d(fg: FoldGraph, node: fx.Node) -> bool:
    """A plain zero-padded Conv2d (or MapConv2d) called on one input."""
    m = fg.module(node)
    return type(m) in (nn.Conv2d, MapConv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)


def is_linear(fg: FoldGraph, node: fx.Node) -> bool:
    return type(fg.module(node)) is nn.Linear


def is_weighted(fg: FoldGraph, node: fx.Node) -> bool:
    return is_conv2d(fg, node) or is_linear(fg, node)


def is_affine(fg: FoldGraph, node: fx.Node) -> bool:
    return isinstance(fg.module(node), ChannelAffine)


def channel_axis(fg: FoldGraph, node: fx.Node) -> int:
    """Positive channel axis of a weighted node's output/input tensors (conv 1, linear last)."""
    return 1 if is_conv2d(fg, node) else len(fg.shape(node)) - 1


def only_input(node: fx.Node) -> fx.Node | None:
    """The node's single tensor input when it is called with exactly one positional Node."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None
