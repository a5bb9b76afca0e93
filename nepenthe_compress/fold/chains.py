"""Merging chains of adjacent linear layers (conv->conv, linear->linear) chosen by a cost model.

A chain is a maximal run of weighted nodes where each one's only user is the next. For each chain a
dynamic programme picks the partition into merged segments with the lowest total cost
(``fold.cost.COST_MODELS``); segments whose merge is not exact are infeasible unless the user opted
in to border-inexact merges.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold.cost import COST_MODELS
from nepenthe_compress.fold.graph import FoldGraph, is_conv2d, is_linear, is_weighted, only_input
from nepenthe_compress.fold.modules import conv_module, conv_spec, linear_module, linear_spec


def find_chains(fg: FoldGraph) -> list[list[fx.Node]]:
    """Maximal chains of >= 2 same-type weighted nodes linked by single-use edges."""
    def next_of(n: fx.Node) -> fx.Node | None:
        if len(n.users) != 1:
            return None
        u = next(iter(n.users))
        same = (is_conv2d(fg, u) and is_conv2d(fg, n)) or (is_linear(fg, u) and is_linear(fg, n))
        return u if same and only_input(u) is n else None

    starts = [n for n in fg.gm.graph.nodes if is_weighted(fg, n) and only_input(n) is not None]
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


def _spec(fg: FoldGraph, node: fx.Node):
    m = fg.module(node)
    return conv_spec(m) if is_conv2d(fg, node) else linear_spec(m)


def _compose(fg: FoldGraph, nodes: list[fx.Node]):
    """(merged spec, None, inexact) of a segment, or (None, NotExact reason, False)."""
    spec = _spec(fg, nodes[0])
    hw = tuple(fg.shape(only_input(nodes[0]))[-2:])
    inexact = False
    for prev, node in zip(nodes, nodes[1:]):
        b = _spec(fg, node)
        if isinstance(spec, A.LinearSpec):
            spec = A.compose_linears(spec, b)
            continue
        try:
            spec = A.compose_convs(spec, b, hw)
        except A.NotExact as e:
            if not (fg.options.allow_inexact and isinstance(e, A.BorderInexact)):
                return None, f"{fg.label(prev)} -> {fg.label(node)}: {e}", False
            spec, inexact = A.compose_convs(spec, b, hw, allow_inexact=True), True
    return spec, None, inexact


def _unsupported(fg: FoldGraph, node: fx.Node) -> str | None:
    """Why a conv-like node next to a weighted layer cannot be merged (None if it can, or is no conv)."""
    m = fg.module(node)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "ConvTranspose merges are not supported (its BatchNorm is still folded)"
    if isinstance(m, nn.modules.conv._ConvNd) and not is_conv2d(fg, node):
        return f"merges of {type(m).__name__} with padding_mode={m.padding_mode!r} are not supported"
    return None


def _report_unsupported(fg: FoldGraph) -> None:
    for node in fg.gm.graph.nodes:
        reason = _unsupported(fg, node)
        neighbours = [*node.users, *node.all_input_nodes]
        if reason and any(is_weighted(fg, n) or _unsupported(fg, n) for n in neighbours):
            fg.record("skip", fg.label(node), reason)


def merge_chains(fg: FoldGraph) -> None:
    """Plan and apply the merges of every chain (no-op for ``--merge none``)."""
    if fg.options.merge == "none":
        return
    _report_unsupported(fg)
    cost = COST_MODELS[fg.options.merge]
    for chain in find_chains(fg):
        for segment in _plan(fg, chain, cost):
            if len(segment) > 1:
                _apply(fg, segment)


def _plan(fg: FoldGraph, chain: list[fx.Node], cost) -> list[list[fx.Node]]:
    n = len(chain)
    seg_cost: dict[tuple[int, int], float] = {}
    for i in range(n):
        for j in range(i, n):
            nodes = chain[i:j + 1]
            if j == i:
                seg_cost[i, j] = cost(_spec(fg, nodes[0]), fg.shape(only_input(nodes[0])))
                continue
            spec, reason, _ = _compose(fg, nodes)
            if spec is None:
                if j == i + 1:
                    fg.record("skip", fg.label(nodes[-1]), f"merge skipped: {reason}")
                break  # longer segments starting at i contain the same inexact pair
            seg_cost[i, j] = cost(spec, fg.shape(only_input(nodes[0])))
    best = [0.0] + [float("inf")] * n
    choice = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = seg_cost.get((i, j - 1))
            if c is not None and best[i] + c < best[j]:
                best[j], choice[j] = best[i] + c, i
    segments, j = [], n
    while j > 0:
        segments.append(chain[choice[j]:j])
        j = choice[j]
    segments.reverse()
    for i in range(n - 1):
        if (i, i + 1) in seg_cost and not any(chain[i] in s and chain[i + 1] in s for s in segments):
            fg.record("skip", fg.label(chain[i + 1]),
                      f"merge with {fg.label(chain[i])} skipped: cost model predicts no gain")
    return segments


def _apply(fg: FoldGraph, segment: list[fx.Node]) -> None:
    spec, _, inexact = _compose(fg, segment)
    first, last = segment[0], segment[-1]
    ref = fg.module(last)
    names = " -> ".join(fg.label(n) for n in segment)
    new = conv_module(spec, ref) if isinstance(spec, A.ConvSpec) else linear_module(spec, ref)
    fg.set_module(last, new, label=f"merged({names})")
    last.replace_input_with(only_input(last), only_input(first))
    for node in reversed(segment[:-1]):
        fg.gm.graph.erase_node(node)
    note = " (BORDER-INEXACT: opted in, see the measured error)" if inexact else ""
    fg.record("merge", names, f"{len(segment)} layers -> 1{note}")
