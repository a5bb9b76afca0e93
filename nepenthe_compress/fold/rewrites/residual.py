"""Residual and parallel branches: ``layer(x) + x``, ``layer1(x) + layer2(x)`` (a residual block with
a 1x1 downsample shortcut, parallel convs or Linears on one input) become one layer, when the
merged layer is exact (aligned taps, equal strides and output sizes) and pays under the cost model."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx

from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold import ops
from nepenthe_compress.fold.protocol import Rewrite, merging
from nepenthe_compress.fold.rewriter import GraphRewriter


@dataclass
class Branches:
    add: fx.Node
    source: fx.Node                  # the input both branches read
    kind: ops.LayerKind
    layers: list[fx.Node | None]     # per operand: its layer node, or None for the identity


@dataclass
class Merge:
    add: fx.Node
    source: fx.Node
    spec: ops.Spec
    like: torch.nn.Module
    names: str


def _branch(rw: GraphRewriter, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(input, layer) of one add operand: a single-use layer reads its input; else the identity."""
    src = ops.only_input(node)
    if src is not None and ops.is_layer(rw.gm, node) and len(node.users) == 1:
        return src, node
    return node, None


def match(rw: GraphRewriter) -> Iterator[Branches]:
    for node in rw.nodes():
        if not ops.is_add(node):
            continue
        (xa, la), (xb, lb) = (_branch(rw, a) for a in node.args)
        layers = [n for n in (la, lb) if n is not None]
        if xa is not xb or not layers or not all(ops.same_layer_kind(rw.gm, layers[0], n) for n in layers):
            continue
        if all(rw.shape(a) == rw.shape(node) for a in node.args):
            yield Branches(node, xa, ops.layer_kind(rw.gm, layers[0]), [la, lb])


def plan(rw: GraphRewriter, b: Branches) -> Merge | None:
    shape = rw.shape(b.source)
    channels = shape[b.kind.channel_axis(len(shape))]
    specs = [b.kind.identity(channels, torch.float64) if n is None else ops.spec_of(rw.gm, n) for n in b.layers]
    try:
        merged = b.kind.add(*specs, shape)
    except A.NotExact as e:
        rw.record("skip", rw.label(b.add), f"residual merge: {e}")
        return None
    if not rw.pays(merged, [s for s, n in zip(specs, b.layers) if n is not None], shape):
        rw.record("skip", rw.label(b.add), "residual merge: cost model predicts no gain")
        return None
    like = rw.module(next(n for n in b.layers if n is not None))
    names = " + ".join("identity" if n is None else rw.label(n) for n in b.layers)
    return Merge(b.add, b.source, merged, like, names)


def apply(rw: GraphRewriter, m: Merge) -> None:
    out = rw.insert_module(m.add, ops.module_of(m.spec, m.like), m.source, f"merged({m.names})")
    rw.bypass(m.add, out)
    rw.record("merge", m.names, "residual branches summed into one layer")


PARALLEL_ADD = Rewrite(
    name="parallel_add",
    pattern="layer(x) + x | layer1(x) + layer2(x) (conv or linear, same input) -> one layer",
    algebra=(A.add_convs, A.identity_conv, A.add_linears, A.identity_linear),
    exactness="equal strides and output sizes and a common tap grid (NotExact otherwise); "
              "exact when each branch is",
    tests="tests/fold/test_parallel_add.py",
    match=match, plan=plan, apply=apply,
    cost="price(merged) <= sum of price(branch layers)", enabled=merging)
