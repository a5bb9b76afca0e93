"""Dead and constant channels (docs/DESIGN.md 4.2): a channel that is constant on the recorded states
(always-OFF ReLU neurons, zero weight rows, linearised saturated neurons) is dropped from its
producer, through per-channel ops (rectifiers, affine maps, depthwise convs, pooling, flatten), and
from every consumer, its constant folded into the consumers' bias (a border map for padded convs).
Channels whose consumers are not all conv/linear layers, e.g. channels coupled through a residual
add, are kept and the skip is reported. Some droppable channels are kept back so that the count left
stays aligned for the runtime's blocked kernels (``FoldOptions.channel_align``, see ``aligned_count``)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor

from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold import ops
from nepenthe_compress.fold.modules import ChannelAffine
from nepenthe_compress.fold.protocol import Rewrite
from nepenthe_compress.fold.rewriter import FoldOptions, GraphRewriter

KEPT_META = "nc_kept_for_alignment"  # node.meta: droppable channels kept back at the last visit
REPORTED_META = "nc_kept_reported"   # node.meta: the kept-back count the log last reported


def aligned_count(channels: int, droppable: int, align: int) -> int:
    """How many of a producer's ``channels`` outputs to keep when ``droppable`` of them are constant.

    The alignment of a count n is gcd(n, align): ``align`` itself for a multiple of it, else the
    largest divisor of ``align`` dividing n (align 8: 56 -> 8, 60 -> 4, 58 -> 2, 57 -> 1). The count
    kept is the smallest one in [channels - droppable, channels] of best alignment in that range, so

    - whenever a multiple of ``align`` is in reach it is ceil((C - D) / align) * align
      (64 with 13 droppable -> 56; 64 with 7 droppable -> 64, nothing dropped);
    - it never exceeds C (no padding) and is never less aligned than C itself (C is in the range):
      61 with 4 droppable -> 60 (a multiple of 4), 6 with 3 droppable -> 4, 58 with 1 droppable -> 58;
    - ``align`` 1 keeps C - D (every droppable channel goes).
    """
    counts = range(channels - droppable, channels + 1)
    best = max(math.gcd(n, align) for n in counts)
    return next(n for n in counts if math.gcd(n, align) == best)


def kept_back(consts: list[float | None], droppable: list[int], count: int) -> list[int]:
    """``count`` of the ``droppable`` channels to keep anyway: those whose constant is 0 first
    (dead rectifier neurons), then the others, each in channel order."""
    return sorted(droppable, key=lambda i: (consts[i] != 0, i))[:count]


def kept_for_alignment(rw: GraphRewriter) -> int:
    """Droppable channels the graph still holds for alignment (as of each producer's last visit)."""
    return sum(n.meta.get(KEPT_META, 0) for n in rw.gm.graph.nodes)


# ---- constants along a per-channel chain ------------------------------------------------------------

def pointwise_chain(rw: GraphRewriter, producer: fx.Node) -> list[fx.Node]:
    """Per-channel nodes following ``producer`` through single-use edges (a flatten ends the chain;
    it is per-channel only for channels on axis 1)."""
    chain, t = [], producer
    flatten_ok = ops.channel_axis(rw.gm, producer) == 1
    while len(t.users) == 1 and not (chain and ops.is_flatten(rw.gm, chain[-1])):
        u = next(iter(t.users))
        if not ops.is_per_channel(rw.gm, u) or (u.args[0] if u.args else None) is not t:
            break
        if ops.is_flatten(rw.gm, u) and not flatten_ok:
            break
        chain.append(u)
        t = u
    return chain


def channel_constants(rw: GraphRewriter, producer: fx.Node, chain: list[fx.Node]) -> list[float | None]:
    """Per output channel: its constant value at the end of ``chain`` or None."""
    m = rw.module(producer)
    w = m.weight.detach().flatten(1)
    bias = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0])
    bias_map = getattr(m, "bias_map", None)
    consts: list[float | None] = []
    for i in range(w.shape[0]):
        flat = bias_map is None or bool((bias_map[i] == 0).all())
        consts.append(float(bias[i]) if flat and not bool(w[i].any()) else None)
    for op in chain:
        consts = _through(rw, op, consts)
    return consts


def _through(rw: GraphRewriter, op: fx.Node, consts: list[float | None]) -> list[float | None]:
    """Constants after one per-channel op: known constants are pushed through the op itself; a
    neuron recorded as always in a state whose (exact) map has slope 0 becomes that state's
    constant. Smooth rectifiers (GELU, SiLU, ...) are never constant on a state."""
    if ops.is_depthwise(rw.gm, op):
        return _through_depthwise(rw.module(op), consts)
    if ops.keeps_constants(rw.gm, op):
        return list(consts)
    n = len(consts)
    known = torch.tensor([c if c is not None else 0.0 for c in consts], dtype=rw.dtype)
    pushed = ops.evaluate(rw.gm, op, {op.args[0]: known.view(1, n)}).flatten().tolist()
    out = [pushed[i] if c is not None else None for i, c in enumerate(consts)]
    if ops.is_affine(rw.gm, op):
        aff = rw.module(op)
        for i in torch.nonzero(aff.scale == 0).flatten().tolist():
            out[i] = float(aff.shift[i])
        return out
    st = rw.stats.get(op.name)
    found = ops.activation(rw.gm, op)
    if st is not None and found is not None and found[0].exact and st.neurons == n:
        kind, params = found
        states = st.neuron_state
        for s in np.unique(states[states >= 0]):
            a, c = kind.affine(params, int(s), n)
            for i in np.nonzero(states == s)[0]:
                if float(a[i]) == 0.0:
                    out[i] = float(c[i])
    return out


def _through_depthwise(m: torch.nn.Conv2d, consts: list[float | None]) -> list[float | None]:
    """A depthwise conv maps a constant channel to a constant when it is 0 (zero padding adds
    nothing) or when the conv reads no padding; a border bias map makes the result non-constant."""
    bias_map = getattr(m, "bias_map", None)
    bias = m.bias.detach() if m.bias is not None else torch.zeros(m.out_channels)
    unpadded = all(p == 0 for p in m.padding)
    out: list[float | None] = []
    for i, c in enumerate(consts):
        flat = bias_map is None or bool((bias_map[i] == 0).all())
        if c is None or not flat or (c != 0 and not unpadded):
            out.append(None)
        else:
            out.append(float(bias[i] + c * m.weight[i].sum()))
    return out


# ---- the rewrite ------------------------------------------------------------------------------------

@dataclass
class Drop:
    producer: fx.Node
    chain: list[fx.Node]
    consumers: list[fx.Node]
    keep: Tensor             # bool per producer channel
    values: Tensor           # float64 constant per producer channel (0 where kept)
    spread: int              # consumer features per channel (flatten: H*W)
    back: int                # channels kept back for alignment
    note: str                # the alignment clause of the event


def match(rw: GraphRewriter) -> Iterator[fx.Node]:
    return (n for n in rw.nodes() if ops.is_layer(rw.gm, n))


def _consumers_ok(rw: GraphRewriter, end: fx.Node, axis: int) -> bool:
    consumers = list(end.users)
    return bool(consumers) and all(
        ops.is_layer(rw.gm, u) and ops.only_input(u) is end and ops.is_dense(rw.gm, u)
        and ops.channel_axis(rw.gm, u) == axis for u in consumers)


def plan(rw: GraphRewriter, producer: fx.Node) -> Drop | None:
    producer.meta[KEPT_META] = 0
    if not ops.is_dense(rw.gm, producer):
        return None
    chain = pointwise_chain(rw, producer)
    end = chain[-1] if chain else producer
    consts = channel_constants(rw, producer, chain)
    drop = [i for i, c in enumerate(consts) if c is not None]
    if not drop or len(drop) == len(consts):
        return None  # nothing constant, or the whole output: constant propagation's job
    flattened = bool(chain) and ops.is_flatten(rw.gm, end)
    axis = 1 if flattened else ops.channel_axis(rw.gm, producer)
    if not _consumers_ok(rw, end, axis):
        consumers = list(end.users)
        names = ", ".join(rw.label(u) if u.op != "output" else "graph output" for u in consumers)
        why = ("coupled through a residual add" if any(u.target in ops.ADD_FUNCTIONS for u in consumers)
               else f"consumers ({names}) are not all conv/linear layers")
        rw.record("skip", rw.label(producer), f"{len(drop)} constant channel(s) kept: {why}")
        return None
    align, total = rw.options.channel_align, len(consts)
    count = aligned_count(total, len(drop), align)
    back = kept_back(consts, drop, count - (total - len(drop)))
    note = f"kept for {align}-alignment ({total - len(drop)} -> {count} kept)"
    producer.meta[KEPT_META] = len(back)
    reported = producer.meta.get(REPORTED_META) == len(back)
    producer.meta[REPORTED_META] = len(back)
    drop = sorted(set(drop) - set(back))
    if not drop:
        if not reported:  # a partial drop's event already said what was kept back
            rw.record("skip", rw.label(producer), f"{len(back)} constant channel(s) {note}")
        return None
    keep = torch.ones(total, dtype=torch.bool)
    keep[drop] = False
    values = torch.tensor([0.0 if keep[i] else consts[i] for i in range(total)], dtype=torch.float64)
    spread = rw.shape(end.args[0])[2:].numel() if flattened else 1
    return Drop(producer, chain, list(end.users), keep, values, spread, len(back), note)


def apply(rw: GraphRewriter, d: Drop) -> None:
    keep, end = d.keep, (d.chain[-1] if d.chain else d.producer)
    kind, m = ops.layer_kind(rw.gm, d.producer), rw.module(d.producer)
    rw.set_module(d.producer, ops.module_of(kind.drop_out(kind.spec_of(m), keep), m))
    for op in d.chain:
        st = rw.stats.get(op.name)
        if st is not None and st.neurons == len(keep):
            rw.stats[op.name] = st.select(keep.numpy())
        if ops.is_affine(rw.gm, op):
            aff = rw.module(op)
            rw.set_module(op, ChannelAffine(aff.scale[keep], aff.shift[keep], aff.axis))
        elif ops.is_depthwise(rw.gm, op):
            dw = rw.module(op)
            rw.set_module(op, ops.module_of(A.drop_depthwise_channels(ops.conv_spec(dw), keep), dw))
    wide_keep, wide_values = keep.repeat_interleave(d.spread), d.values.repeat_interleave(d.spread)
    for u in d.consumers:
        kind, m = ops.layer_kind(rw.gm, u), rw.module(u)
        rw.set_module(u, ops.module_of(kind.drop_in(kind.spec_of(m), wide_keep, wide_values, rw.shape(end)), m))
    dropped = int((~keep).sum())
    nonzero = int((d.values != 0).sum())
    rw.record("drop", rw.label(d.producer), f"{dropped} constant channel(s) removed "
              f"({dropped - nonzero} zero, {nonzero} folded into the consumers' bias)"
              + (f", {d.back} {d.note}" if d.back else ""))
    rw.channels_dropped += dropped
    rw.shapes_stale = True


def _enabled(options: FoldOptions) -> bool:
    return options.drop_channels


DROP_CHANNELS = Rewrite(
    name="drop_constant_channels",
    pattern="conv | linear -> per-channel ops (rectifier, affine, depthwise, pooling, flatten) -> "
            "conv | linear consumers; constant channels -> dropped",
    algebra=(A.drop_conv_outputs, A.drop_linear_outputs, A.drop_depthwise_channels,
             A.drop_conv_inputs, A.drop_linear_inputs),
    exactness="always: the constant goes into the consumers' bias (a border bias map for zero-padded "
              "convs); needs every consumer to be a dense conv/linear (not a residual add)",
    tests="tests/fold/test_drop_constant_channels.py",
    match=match, plan=plan, apply=apply, enabled=_enabled)
