"""Local rewrites around per-channel affine maps: eval no-ops go, an eval BatchNorm becomes an
affine map, and affine maps fold into the weighted layer before them or the layers after them.
LayerNorm's own affine (gamma, beta) folds into the Linears reading it. All exact."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold import ops
from nepenthe_compress.fold.modules import ChannelAffine
from nepenthe_compress.fold.protocol import Rewrite
from nepenthe_compress.fold.rewriter import GraphRewriter

def _matching(rw: GraphRewriter, predicate) -> Iterator[fx.Node]:
    return (n for n in rw.nodes() if predicate(rw, n))


def _scale_shift(m: ChannelAffine) -> tuple[Tensor, Tensor]:
    return m.scale.double(), m.shift.double()


# ---- eval no-ops ----------------------------------------------------------------------------------

def _is_noop(rw: GraphRewriter, node: fx.Node) -> bool:
    return ops.is_eval_noop(rw.gm, node) and bool(node.args) and isinstance(node.args[0], fx.Node)


def _drop_noop(rw: GraphRewriter, node: fx.Node) -> None:
    rw.bypass(node, node.args[0])


DROP_NOOP = Rewrite(
    name="drop_eval_noop",
    pattern="Dropout | Identity | identity affine -> (removed)",
    algebra=(), exactness="always (eval mode)", tests="tests/fold/test_drop_eval_noop.py",
    match=lambda rw: _matching(rw, _is_noop), plan=lambda rw, node: node, apply=_drop_noop)


# ---- BatchNorm -> affine ---------------------------------------------------------------------------

def _bn_plan(rw: GraphRewriter, node: fx.Node) -> tuple[fx.Node, ChannelAffine] | None:
    m = rw.module(node)
    if m.running_mean is None or m.running_var is None:
        rw.record("skip", rw.label(node), "BatchNorm without running statistics cannot be folded")
        return None
    a, c = A.batchnorm_affine(m.running_mean.double(), m.running_var.double(),
                              None if m.weight is None else m.weight.detach().double(),
                              None if m.bias is None else m.bias.detach().double(), m.eps)
    return node, ChannelAffine(a.to(rw.dtype), c.to(rw.dtype), axis=1)


BATCHNORM = Rewrite(
    name="batchnorm_to_affine",
    pattern="BatchNorm (eval) -> per-channel affine",
    algebra=(A.batchnorm_affine,), exactness="always (eval mode; needs running statistics)",
    tests="tests/fold/test_batchnorm_to_affine.py",
    match=lambda rw: _matching(rw, lambda rw, n: ops.is_batchnorm(rw.gm, n)),
    plan=_bn_plan, apply=lambda rw, p: rw.set_module(*p))


# ---- affine -> into the layer before ----------------------------------------------------------------

@dataclass
class Replace:
    """New modules: ``module`` for ``node`` and/or ``into`` for its users; ``source`` is the node's
    input, which takes its place."""
    node: fx.Node
    module: nn.Module | None = None
    into: list[tuple[fx.Node, nn.Module]] | None = None
    source: fx.Node | None = None


def _into_producer_match(rw: GraphRewriter) -> Iterator[fx.Node]:
    for node in rw.nodes():
        src = ops.only_input(node) if ops.is_affine(rw.gm, node) else None
        kind = None if src is None or len(src.users) != 1 else ops.layer_kind(rw.gm, src)
        if kind is not None and kind.then_affine is not None:
            rank = len(rw.shape(node))
            if rw.module(node).axis % rank == kind.channel_axis(rank):
                yield node


def _into_producer_plan(rw: GraphRewriter, node: fx.Node) -> Replace:
    src = ops.only_input(node)
    kind, m = ops.layer_kind(rw.gm, src), rw.module(src)
    spec = kind.then_affine(kind.spec_of(m), *_scale_shift(rw.module(node)))
    return Replace(node, ops.module_of(spec, m), source=src)


def _into_producer_apply(rw: GraphRewriter, p: Replace) -> None:
    rw.set_module(p.source, p.module)
    rw.record("fold", rw.label(p.node), f"into {rw.label(p.source)}")
    rw.bypass(p.node, p.source)


INTO_PRODUCER = Rewrite(
    name="affine_into_producer",
    pattern="conv | linear | conv_transpose -> per-channel affine",
    algebra=(A.conv_then_affine, A.linear_then_affine, A.conv_transpose_then_affine),
    exactness="always", tests="tests/fold/test_affine_into_producer.py",
    match=_into_producer_match, plan=_into_producer_plan, apply=_into_producer_apply)


# ---- affine -> into the layers after ----------------------------------------------------------------

def _reads_channels_of(rw: GraphRewriter, user: fx.Node, node: fx.Node, axis: int) -> bool:
    kind = ops.layer_kind(rw.gm, user)
    return (kind is not None and kind.affine_then is not None and ops.only_input(user) is node
            and ops.channel_axis(rw.gm, user) == axis)


def _into_consumers_match(rw: GraphRewriter) -> Iterator[fx.Node]:
    for node in rw.nodes():
        if ops.is_affine(rw.gm, node) and node.users and ops.only_input(node) is not None:
            axis = rw.module(node).axis % len(rw.shape(node))
            if all(_reads_channels_of(rw, u, node, axis) for u in node.users):
                yield node


def _into_consumers_plan(rw: GraphRewriter, node: fx.Node) -> Replace:
    a, c = _scale_shift(rw.module(node))
    into = []
    for u in node.users:
        kind, m = ops.layer_kind(rw.gm, u), rw.module(u)
        into.append((u, ops.module_of(kind.affine_then(a, c, kind.spec_of(m), rw.shape(node)), m)))
    return Replace(node, into=into, source=ops.only_input(node))


def _into_consumers_apply(rw: GraphRewriter, p: Replace) -> None:
    for user, module in p.into:
        rw.set_module(user, module)
        user.replace_input_with(p.node, p.source)
        rw.record("fold", rw.label(p.node), f"into {rw.label(user)}")
    rw.gm.graph.erase_node(p.node)


INTO_CONSUMERS = Rewrite(
    name="affine_into_consumers",
    pattern="per-channel affine -> conv | linear (every user)",
    algebra=(A.affine_then_conv, A.affine_then_linear),
    exactness="always; a zero-padded conv gets a border bias map for the recorded input size",
    tests="tests/fold/test_affine_into_consumers.py",
    match=_into_consumers_match, plan=_into_consumers_plan, apply=_into_consumers_apply)


# ---- LayerNorm's affine -> into the Linears after ---------------------------------------------------

def _layernorm_match(rw: GraphRewriter) -> Iterator[fx.Node]:
    for node in rw.nodes():
        if ops.is_layernorm(rw.gm, node) and node.users:
            last = len(rw.shape(node)) - 1
            if all(_reads_channels_of(rw, u, node, last) for u in node.users):
                yield node


def _layernorm_plan(rw: GraphRewriter, node: fx.Node) -> Replace:
    m = rw.module(node)
    gamma = m.weight.detach().double()
    beta = m.bias.detach().double() if m.bias is not None else torch.zeros_like(gamma)
    into = []
    for u in node.users:
        kind, lin = ops.layer_kind(rw.gm, u), rw.module(u)
        into.append((u, ops.module_of(kind.affine_then(gamma, beta, kind.spec_of(lin), rw.shape(node)), lin)))
    return Replace(node, nn.LayerNorm(m.normalized_shape, m.eps, elementwise_affine=False), into)


def _layernorm_apply(rw: GraphRewriter, p: Replace) -> None:
    for user, module in p.into:
        rw.set_module(user, module)
        rw.record("fold", f"{rw.label(p.node)} affine", f"into {rw.label(user)}")
    rw.set_module(p.node, p.module)


LAYERNORM = Rewrite(
    name="layernorm_affine_into_linears",
    pattern="LayerNorm(affine) -> linear (every user)",
    algebra=(A.affine_then_linear,), exactness="always (the LayerNorm keeps its normalisation)",
    tests="tests/fold/test_layernorm_affine_into_linears.py",
    match=_layernorm_match, plan=_layernorm_plan, apply=_layernorm_apply)
