"""Merging chains of adjacent layers of one kind (conv -> conv, linear -> linear), chosen by price.

A chain is a maximal run of layer nodes where each one's only user is the next. For each chain a
dynamic programme picks the partition into merged segments with the lowest total price
(``GraphRewriter.price``, the driver's cost model under the ``--merge`` mode); segments whose merge
is not exact are infeasible unless the user opted in to border-inexact merges (a padded conv into a
zero-padded conv is exact with a border correction, ``fold.border``; a segment of three or more
such convs is not). Candidates are priced from their structure (``LayerKind.structure``: shapes,
groups and pieces, no weights, which is all a cost model reads); only the chosen segments are composed. Conv-like
layers that cannot merge at all (ConvTranspose, non-zero padding modes) next to a layer are reported.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.fx as fx

from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold import border
from nepenthe_compress.fold import ops
from nepenthe_compress.fold.protocol import Rewrite, merging
from nepenthe_compress.fold.rewriter import GraphRewriter


@dataclass
class Refusal:
    node: fx.Node
    reason: str


@dataclass
class Segment:
    nodes: list[fx.Node]
    spec: ops.Spec      # the merged layer (a structure-only stand-in while it is being priced)
    inexact: bool


def find_chains(rw: GraphRewriter) -> list[list[fx.Node]]:
    """Maximal chains of >= 2 same-kind layer nodes linked by single-use edges."""
    def next_of(n: fx.Node) -> fx.Node | None:
        if len(n.users) != 1:
            return None
        u = next(iter(n.users))
        return u if ops.same_layer_kind(rw.gm, n, u) and ops.only_input(u) is n else None

    starts = [n for n in rw.gm.graph.nodes if ops.is_layer(rw.gm, n) and ops.only_input(n) is not None]
    has_prev = {next_of(n) for n in starts} - {None}
    chains = []
    for n in starts:
        if n in has_prev:
            continue
        chain = [n]
        while (nxt := next_of(chain[-1])) is not None:
            chain.append(nxt)
        if len(chain) > 1:
            chains.append(chain)
    return chains


def _refusals(rw: GraphRewriter) -> Iterator[Refusal]:
    for node in rw.gm.graph.nodes:
        reason = ops.merge_refusal(rw.gm, node)
        neighbours = [*node.users, *node.all_input_nodes]
        if reason and any(ops.is_layer(rw.gm, n) or ops.merge_refusal(rw.gm, n) for n in neighbours):
            yield Refusal(node, reason)


def match(rw: GraphRewriter) -> Iterator[Refusal | list[fx.Node]]:
    yield from list(_refusals(rw))
    yield from find_chains(rw)


def _composed(rw: GraphRewriter, nodes: list[fx.Node], allow_inexact: bool, weights: bool) -> ops.Spec:
    """The layers of ``nodes`` composed in order (``weights=False``: the structure only);
    ``NotExact`` names the pair that refused."""
    kind = ops.layer_kind(rw.gm, nodes[0])
    merge = kind.compose if weights or kind.structure is None else kind.structure
    spec = ops.spec_of(rw.gm, nodes[0])
    shape = rw.shape(ops.only_input(nodes[0]))
    for prev, node in zip(nodes, nodes[1:]):
        try:
            spec = merge(spec, ops.spec_of(rw.gm, node), shape, allow_inexact)
        except A.NotExact as e:
            raise type(e)(f"{rw.label(prev)} -> {rw.label(node)}: {e}") from e
    return spec


def compose(rw: GraphRewriter, nodes: list[fx.Node], weights: bool = True) -> Segment | str:
    """The merged segment (exact: border-corrected where a padded conv feeds a padded conv), or
    why it cannot be merged; with ``--allow-inexact`` a segment refused as border-inexact (three or
    more padded convs) is composed without correction instead. ``weights=False``: its structure
    only (``LayerKind.structure``), enough to price it."""
    try:
        return Segment(nodes, _composed(rw, nodes, False, weights), False)
    except A.BorderInexact as e:
        if not rw.options.allow_inexact:
            return str(e)
    except A.NotExact as e:
        return str(e)
    try:
        return Segment(nodes, _composed(rw, nodes, True, weights), True)
    except A.NotExact as e:
        return str(e)


def _built(rw: GraphRewriter, priced: Segment) -> Segment:
    """A chosen segment composed with its weights (after it was priced from its structure)."""
    seg = compose(rw, priced.nodes)
    if isinstance(seg, str) or seg.inexact != priced.inexact:
        raise RuntimeError(f"internal error: the priced merge {rw.label(priced.nodes[-1])} does not compose alike")
    return seg


def partition(rw: GraphRewriter, chain: list[fx.Node]) -> list[Segment]:
    """The cheapest partition of ``chain`` into merged segments (by dynamic programming)."""
    n = len(chain)
    shapes = [rw.shape(ops.only_input(node)) for node in chain]
    priced: dict[tuple[int, int], tuple[float, Segment | None]] = {}  # (first, last) -> price, merge
    for i in range(n):
        priced[i, i] = (rw.price(ops.spec_of(rw.gm, chain[i]), shapes[i]), None)
        for j in range(i + 1, n):
            seg = compose(rw, chain[i:j + 1], weights=False)
            if isinstance(seg, str):
                if j == i + 1:
                    rw.record("skip", rw.label(chain[j]), f"merge skipped: {seg}")
                break  # longer segments starting at i contain the same inexact pair
            priced[i, j] = (rw.price(seg.spec, shapes[i]), seg)
    best = [0.0] + [float("inf")] * n
    choice = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            if (i, j - 1) in priced and best[i] + priced[i, j - 1][0] < best[j]:
                best[j], choice[j] = best[i] + priced[i, j - 1][0], i
    segments, j = [], n
    while j > 0:
        segments.append((choice[j], j - 1))
        j = choice[j]
    chosen = {p for a, k in segments for p in range(a, k)}  # i merged with i + 1
    for i in range(n - 1):
        if (i, i + 1) in priced and i not in chosen:
            rw.record("skip", rw.label(chain[i + 1]),
                      f"merge with {rw.label(chain[i])} skipped: cost model predicts no gain")
    return [_built(rw, priced[i, k][1]) for i, k in reversed(segments) if k > i]


def plan(rw: GraphRewriter, candidate: Refusal | list[fx.Node]) -> list[Segment] | None:
    if isinstance(candidate, Refusal):
        rw.record("skip", rw.label(candidate.node), candidate.reason)
        return None
    return partition(rw, candidate) or None


def apply(rw: GraphRewriter, segments: list[Segment]) -> None:
    for seg in segments:
        first, last = seg.nodes[0], seg.nodes[-1]
        names = " -> ".join(rw.label(n) for n in seg.nodes)
        rw.set_module(last, ops.module_of(seg.spec, rw.module(last)), label=f"merged({names})")
        last.replace_input_with(ops.only_input(last), ops.only_input(first))
        for node in reversed(seg.nodes[:-1]):
            rw.gm.graph.erase_node(node)
        note = " (BORDER-INEXACT: opted in, see the measured error)" if seg.inexact else _correction(seg.spec)
        rw.record("merge", names, f"{len(seg.nodes)} layers -> 1{note}")


def _correction(spec: ops.Spec) -> str:
    pieces = sum(g.count for g in getattr(spec, "pieces", ()))
    return f" (exact with a border correction: {pieces} edge/corner convs in parallel)" if pieces else ""


MERGE_CHAINS = Rewrite(
    name="merge_chains",
    pattern="conv -> conv -> ... | linear -> linear -> ... (single-use edges) -> fewer layers",
    algebra=(A.compose_convs, border.compose_corrected, A.compose_linears),
    exactness="linear: always; conv: when the second has padding 0, or per dim pA >= (kA-1)*dA "
              "(e.g. a 1x1 first, with a border bias map); a padded KxK -> zero-padded KxK pair "
              "exactly with a border correction (edge and corner convs over x's border strips, in "
              "parallel; for the input size folded on); three or more such convs in one segment "
              "only with --allow-inexact (error measured)",
    tests="tests/fold/test_merge_chains.py",
    match=match, plan=plan, apply=apply,
    cost="dynamic programme over segment prices (price of each candidate's structure: shapes, groups, "
         "pieces, no weights; only the chosen segments are composed)", enabled=merging)
