"""Constant propagation: a layer whose weights are all zero (pruned away entirely) outputs its bias
whatever the input; every node computed only from constants is constant too. A constant added to a
live tensor (a pruned residual branch, y = x + F(x) with F constant) becomes a per-channel shift of
that tensor (foldable like any affine map) or a constant add. Exact."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from nepenthe_compress.fold import ops
from nepenthe_compress.fold.modules import AddConstant, ChannelAffine
from nepenthe_compress.fold.protocol import Rewrite
from nepenthe_compress.fold.rewriter import GraphRewriter


def is_seed(rw: GraphRewriter, node: fx.Node) -> bool:
    """A weighted layer with all-zero weights: a constant whatever its input."""
    return ops.is_layer(rw.gm, node) and not bool(rw.module(node).weight.any())


def constant_values(rw: GraphRewriter) -> dict[fx.Node, Tensor]:
    """Batch-1 value of every node that is constant (seeds run on zeros: they ignore their input)."""
    values: dict[fx.Node, Tensor] = {}
    for node in rw.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        inputs = node.all_input_nodes
        if is_seed(rw, node):
            out = ops.evaluate(rw.gm, node, {node.args[0]: torch.zeros((1, *rw.shape(node.args[0])[1:]),
                                                                       dtype=rw.dtype)})
        elif inputs and all(n in values for n in inputs):
            out = ops.evaluate(rw.gm, node, values)
        else:
            continue
        if isinstance(out, Tensor):
            values[node] = out
    return values


def channel_shift(value: Tensor) -> tuple[Tensor, int] | None:
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


@dataclass
class ConstantBranch:
    constant: fx.Node      # the constant operand
    add: fx.Node
    live: fx.Node          # the other operand
    value: Tensor


def match(rw: GraphRewriter) -> Iterator[ConstantBranch]:
    values = constant_values(rw)
    for node, value in values.items():
        for user in list(node.users):
            if user in values or not ops.is_add(user):
                continue
            live = user.args[1] if user.args[0] is node else user.args[0]
            if rw.shape(user) == rw.shape(live):
                yield ConstantBranch(node, user, live, value)


def plan(rw: GraphRewriter, c: ConstantBranch) -> tuple[ConstantBranch, nn.Module, str]:
    shift = channel_shift(c.value)
    if shift is None:
        return c, AddConstant(c.value[0]), "constant add"
    return c, ChannelAffine(torch.ones_like(shift[0]), *shift), "per-channel shift"


def apply(rw: GraphRewriter, p: tuple[ConstantBranch, nn.Module, str]) -> None:
    c, module, what = p
    rw.bypass(c.add, rw.insert_module(c.add, module, c.live, f"{rw.label(c.add)} (constant branch)"))
    rw.record("constant", rw.label(c.constant), f"layer computes a constant: its branch of "
              f"{rw.label(c.add)} becomes a {what}")


CONSTANT_BRANCH = Rewrite(
    name="constant_branch",
    pattern="layer with all-zero weights ... -> constant; live + constant -> per-channel shift | constant add",
    algebra=(channel_shift,),
    exactness="always (the constant is computed by running the graph on it)",
    tests="tests/fold/test_constant_branch.py",
    match=match, plan=plan, apply=apply)
