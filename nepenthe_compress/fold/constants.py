"""Constant propagation: a conv / linear whose weights are all zero (a layer pruned away entirely)
outputs its bias whatever the input; every node computed only from constants is constant too. A
constant added to a live tensor (a pruned residual branch, y = x + F(x) with F constant) becomes a
per-channel shift of that tensor (foldable like any affine map) or a constant add. Exact."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from nepenthe_compress.fold.graph import ADD_FUNCTIONS, FoldGraph, is_weighted
from nepenthe_compress.fold.modules import AddConstant, ChannelAffine


def _is_seed(fg: FoldGraph, node: fx.Node) -> bool:
    return is_weighted(fg, node) and not bool(fg.module(node).weight.any())


def _evaluate(fg: FoldGraph, node: fx.Node, values: dict[fx.Node, Tensor]) -> Tensor:
    """Run ``node`` on batch-1 constants (a seed runs on zeros: it ignores its input)."""
    if _is_seed(fg, node):
        zeros = torch.zeros((1, *fg.shape(node.args[0])[1:]), dtype=fg.dtype)
        return fg.module(node)(zeros)
    args = fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
    if node.op == "call_module":
        return fg.module(node)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _constant_nodes(fg: FoldGraph) -> dict[fx.Node, Tensor]:
    values: dict[fx.Node, Tensor] = {}
    for node in fg.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        inputs = node.all_input_nodes
        if _is_seed(fg, node) or (inputs and all(n in values for n in inputs)):
            out = _evaluate(fg, node, values)
            if isinstance(out, Tensor):
                values[node] = out
    return values


def _shift(value: Tensor) -> tuple[Tensor, int] | None:
    """(per-channel shift, axis) when the batch-1 ``value`` is constant along all but one axis."""
    v = value[0]
    if v.dim() == 1:
        return v, -1
    if bool((v == v.flatten(1)[:, :1].view(-1, *[1] * (v.dim() - 1))).all()):
        return v.flatten(1)[:, 0], 1
    last = v.reshape(-1, v.shape[-1])
    if bool((last == last[:1]).all()):
        return last[0], -1
    return None


def propagate_constants(fg: FoldGraph) -> bool:
    """Replace ``live + constant`` adds by a shift of the live operand; True if the graph changed."""
    values = _constant_nodes(fg)
    changed = False
    for node, value in values.items():
        for user in list(node.users):
            if user.op != "call_function" or user.target not in ADD_FUNCTIONS or user in values:
                continue
            if len(user.args) != 2 or user.kwargs:
                continue
            live = user.args[1] if user.args[0] is node else user.args[0]
            if not isinstance(live, fx.Node) or fg.shape(user) != fg.shape(live):
                continue
            shift = _shift(value)
            module = ChannelAffine(torch.ones_like(shift[0]), *shift) if shift else AddConstant(value[0])
            new = fg.insert_module(user, module, live, f"{fg.label(user)} (constant branch)")
            fg.bypass(user, new)
            fg.record("constant", fg.label(node), f"layer computes a constant: its branch of "
                      f"{fg.label(user)} becomes a {'per-channel shift' if shift else 'constant add'}")
            changed = True
    return changed
